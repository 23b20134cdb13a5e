// Argument checks shared by the CPU and CUDA implementations of every op.
// The Python layer validates first and names the model layer; these checks are the safety net for
// C++ callers and name the op and the position of the offending entry in its lists.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace lorm_ext {

// The largest max |G − Gᵀ| a Gram of this dtype may have, relative to max diag(G): sqrt(eps), since GEMM rounding
// lets GEMM-made Grams differ from their transpose. The one rule for every check (Python reads it from here).
double symmetry_tolerance(at::ScalarType dtype);

// A Gram is float32/float64, contiguous, and either (n, n) or (n,) (diagonal-only).
bool is_diagonal_gram(const at::Tensor& gram);

// Whether any two of the tensors share bytes. Every op takes the entries of a list on one device and
// refuses an entry whose own accumulators overlap; the same accumulator in two entries is allowed, and the
// implementations then apply those entries one after another, in list order.
bool any_overlap(const std::vector<at::Tensor>& tensors);

// gram_stats: non-empty (n, n) or (n,) floating-point Grams, all on one device.
void check_gram_stats_args(at::TensorList grams);

// gram_accumulate_: grams[i] (n, n) or (n,); inputs[i] (..., n) floating point; same device.
void check_gram_accumulate_args(at::TensorList grams, at::TensorList inputs);

// gram_weighted_accumulate_: gram_sums[i] += grams[i]; weighted_sums[i] += [lefts[i] @] factors[i] @ grams[i].
void check_gram_weighted_accumulate_args(at::TensorList gram_sums, at::TensorList weighted_sums, at::TensorList grams,
                                         at::TensorList factors, at::TensorList lefts);

// projected_accumulate_: P = A G Aᵀ; projection_sums[i] += P; weighted_sums[i] += factors_b[i] @ P.
void check_projected_accumulate_args(at::TensorList projection_sums, at::TensorList weighted_sums, at::TensorList grams,
                                     at::TensorList shared_a, at::TensorList factors_b);

}  // namespace lorm_ext
