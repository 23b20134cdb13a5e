// lorm_ext._C: loading this module runs the TORCH_LIBRARY registrations of every op
// (torch.ops.lorm_ext.*). The pybind11 functions report how the library was built.
#include <pybind11/pybind11.h>

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
}
