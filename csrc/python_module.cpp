// lorm_ext._C: loading this module runs the TORCH_LIBRARY registrations of every op
// (torch.ops.lorm_ext.*). The pybind11 functions report how the library was built and, in a CUDA build,
// which CUDA implementation the ops run (cuda/aten_ops.h).
#include <pybind11/pybind11.h>
#include <torch/csrc/utils/pybind.h>

#include "checks.h"

#ifdef LORM_EXT_WITH_CUDA
#include <c10/util/Exception.h>

#include <string>

#include "cuda/aten_ops.h"
#endif

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
  m.def("symmetry_tolerance", &lorm_ext::symmetry_tolerance,
        "The largest max |G - G^T| accepted for a Gram of this dtype, relative to its largest diagonal entry.");
  m.def(
      "first_value_problem",
      [](const std::vector<at::Tensor>& grams, const std::vector<at::Tensor>& matrices) -> pybind11::object {
        const auto found = lorm_ext::first_value_problem(grams, matrices);
        if (!found.has_value()) {
          return pybind11::none();
        }
        return pybind11::make_tuple(found->entry, lorm_ext::value_problem_name(found->check.problem),
                                    found->check.value);
      },
      "(index, problem, value) of the first of grams + matrices whose values fail the checks (problem: "
      "'non_finite', 'negative_diagonal' or 'asymmetric'), or None.");
#ifdef LORM_EXT_WITH_CUDA
  // An invalid choice is a ValueError with c10's message alone (its what() carries a C++ backtrace).
  m.def(
      "cuda_kernels",
      [] {
        try {
          return std::string(lorm_ext::cuda::kernels_name(lorm_ext::cuda::kernels()));
        } catch (const c10::Error& e) {
          throw pybind11::value_error(e.what_without_backtrace());
        }
      },
      "The CUDA implementation the ops run: 'aten' or 'custom'.");
  m.def(
      "set_cuda_kernels",
      [](const std::string& name) {
        try {
          lorm_ext::cuda::set_kernels(name);
        } catch (const c10::Error& e) {
          throw pybind11::value_error(e.what_without_backtrace());
        }
      },
      "Make the ops run the named CUDA implementation, 'aten' or 'custom', from now on.");
#endif
}
