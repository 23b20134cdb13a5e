// lorm_ext for C++ users: typed wrappers of the ops that csrc/ops.cpp declares, calling through the dispatcher
// (so the CPU or CUDA implementation is picked from the tensors' device, as from Python). Link lorm_ext to have
// the ops registered. The meaning of every argument is in csrc/ops.cpp and lorm_ext/reference.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

namespace lorm_ext {

namespace detail {
template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}
}  // namespace detail

// grams[i] += inputs[i]ᵀ inputs[i] in place; a 1-D gram accumulates the diagonal.
inline void gram_accumulate_(at::TensorList grams, at::TensorList inputs) {
  static const auto call = detail::op<void(at::TensorList, at::TensorList)>("lorm_ext::gram_accumulate_");
  call.call(grams, inputs);
}

// gram_sums[i] += grams[i]; weighted_sums[i] += [lefts[i] @] factors[i] @ grams[i] (lefts empty or one per layer).
inline void gram_weighted_accumulate_(at::TensorList gram_sums, at::TensorList weighted_sums, at::TensorList grams,
                                      at::TensorList factors, at::TensorList lefts = {}) {
  static const auto call =
      detail::op<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList)>(
          "lorm_ext::gram_weighted_accumulate_");
  call.call(gram_sums, weighted_sums, grams, factors, lefts);
}

// P = shared_a[i] grams[i] shared_a[i]ᵀ; projection_sums[i] += P; weighted_sums[i] += factors_b[i] P.
inline void projected_accumulate_(at::TensorList projection_sums, at::TensorList weighted_sums, at::TensorList grams,
                                  at::TensorList shared_a, at::TensorList factors_b) {
  static const auto call =
      detail::op<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList)>(
          "lorm_ext::projected_accumulate_");
  call.call(projection_sums, weighted_sums, grams, shared_a, factors_b);
}

// (len(grams), 4) float64: [max |G − Gᵀ|, min diag, max diag, non-finite count] per Gram, in one read.
inline at::Tensor gram_stats(at::TensorList grams) {
  static const auto call = detail::op<at::Tensor(at::TensorList)>("lorm_ext::gram_stats");
  return call.call(grams);
}

// rhs @ pinv(gram) with torch.pinverse's rcond rule; gram (..., n, n), (..., 1, n) or a diagonal (..., n).
inline at::Tensor psd_right_solve(const at::Tensor& rhs, const at::Tensor& gram, double rcond = 1e-15) {
  static const auto call =
      detail::op<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("lorm_ext::psd_right_solve");
  return call.call(rhs, gram, rcond);
}

}  // namespace lorm_ext
