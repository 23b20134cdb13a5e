// Argument checks shared by the CPU and CUDA implementations of every op.
// They name the op and the position of the offending entry in its lists. The Python mergers check a client's
// structure themselves (naming the model layer) only when it differs from the last client's layer names, or when
// these checks refuse it: every check an op needs before writing is here.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace lorm_ext {

// The largest max |G − Gᵀ| a Gram of this dtype may have, relative to max diag(G): sqrt(eps), since GEMM rounding
// lets GEMM-made Grams differ from their transpose. The one rule for every check (Python reads it from here).
double symmetry_tolerance(at::ScalarType dtype);

// Whether a Gram of this dtype with this max |G − Gᵀ| and max diag(G) is too asymmetric (symmetry_tolerance).
bool exceeds_symmetry_tolerance(double asymmetry, double max_diagonal, at::ScalarType dtype);

// What is wrong with a tensor's values, read from its gram_stats row [max |G − Gᵀ|, min diag, max diag,
// non-finite count]: the one rule of the value checks. A Gram must be finite, have no negative diagonal entry
// and be symmetric; any other tensor (flattened) only finite. `value` says how much: the non-finite count, the
// smallest diagonal entry, max |G − Gᵀ|.
enum class ValueProblem { kNone, kNonFinite, kNegativeDiagonal, kAsymmetric };
struct ValueCheck {
  ValueProblem problem;
  double value;
};
ValueCheck check_value_stats(const double* stats, at::ScalarType dtype, bool is_gram);
const char* value_problem_name(ValueProblem problem);  // "non_finite", "negative_diagonal", "asymmetric"

// The first of grams then matrices (in that order) whose values fail check_value_stats, by its index in the two
// lists together; none when all pass. Grams are (n, n) or (n,); matrices any shape (only finiteness is checked);
// empty tensors pass. One gram_stats call per device reads them all.
struct EntryProblem {
  size_t entry;
  ValueCheck check;
};
std::optional<EntryProblem> first_value_problem(at::TensorList grams, at::TensorList matrices);

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
