// The two CUDA implementations of the accumulation ops and gram_stats, and the run-time choice between them:
//   aten    compositions of ATen ops (cuBLAS through at::mm, a few reductions): the default, as these are
//           calls whose results torch itself guarantees;
//   custom  the kernels of this folder (gram_kernel.cu, merge_kernel.cu, gram_stats_kernel.cu): one
//           launch for many layers, tensor cores for 16-bit inputs, one read of each client Gram.
// The custom kernels become the default only after the whole test suite has passed with them on a GPU.
// psd_right_solve has one implementation (solve.cpp, ATen on every device).
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace lorm_ext::cuda {

enum class Kernels { Aten, Custom };

// LORM_EXT_CUDA_KERNELS=aten|custom, read once, at the first call; unset or empty means aten. An invalid
// value raises an error naming the variable, at that call and at every later one. set_kernels overrides
// the variable for the rest of the process (the tests and benchmarks compare the two implementations).
Kernels kernels();
void set_kernels(const std::string& name);
const char* kernels_name(Kernels choice);

// The ATen implementations. The caller has checked the arguments (checks.h).
namespace aten {
void gram_accumulate(at::TensorList grams, at::TensorList inputs);
void gram_weighted_accumulate(at::TensorList gram_sums, at::TensorList weighted_sums, at::TensorList grams,
                              at::TensorList factors, at::TensorList lefts);
void projected_accumulate(at::TensorList projection_sums, at::TensorList weighted_sums, at::TensorList grams,
                          at::TensorList shared_a, at::TensorList factors_b);
at::Tensor gram_stats(at::TensorList grams);
}  // namespace aten

}  // namespace lorm_ext::cuda
