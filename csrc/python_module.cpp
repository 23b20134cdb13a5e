// lorm_ext._C: loading this module runs the TORCH_LIBRARY registrations of every op
// (torch.ops.lorm_ext.*). The pybind11 functions report how the library was built.
#include <pybind11/pybind11.h>
#include <torch/csrc/utils/pybind.h>

#include "checks.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "lorm_ext native library: registers torch.ops.lorm_ext.*";
  m.def(
      "compiled_with_cuda",
      [] {
#ifdef LORM_EXT_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "Whether the CUDA implementations were compiled into this build.");
  m.def(
      "symmetry_tolerance", &lorm_ext::symmetry_tolerance,
      "The largest max |G - G^T| accepted for a Gram of this dtype, relative to its largest diagonal entry.");
}
