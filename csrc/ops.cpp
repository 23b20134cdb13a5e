// The one schema file: every op of the lorm_ext library is declared here. Implementations register
// per backend (cpu/, cuda/) with TORCH_LIBRARY_IMPL; lorm_ext/reference.py is their specification.
#include <torch/library.h>

TORCH_LIBRARY(lorm_ext, m) {
  // grams[i] += inputs[i]ᵀ inputs[i] in place, inputs flattened to (tokens, n) and upcast on the fly to
  // the Gram's dtype. A 1-D gram accumulates only the diagonal (column sums of squares).
  m.def("gram_accumulate_(Tensor(a!)[] grams, Tensor[] inputs) -> ()");

  // gram_sums[i] += grams[i]; weighted_sums[i] += [lefts[i] @] factors[i] @ grams[i].
  // One read of each client Gram serves both sums (RegMean, the LoRM A-step, the cross-task merge).
  // lefts is empty, or one (m, p) matrix per layer (the general A-step: Σ B_k A_k G_k).
  m.def(
      "gram_weighted_accumulate_(Tensor(a!)[] gram_sums, Tensor(b!)[] weighted_sums, Tensor[] grams, "
      "Tensor[] factors, Tensor[] lefts) -> ()");

  // P = shared_a[i] @ grams[i] @ shared_a[i]ᵀ (r × r);
  // projection_sums[i] += P; weighted_sums[i] += factors_b[i] @ P (the LoRM B-step).
  m.def(
      "projected_accumulate_(Tensor(a!)[] projection_sums, Tensor(b!)[] weighted_sums, Tensor[] grams, "
      "Tensor[] shared_a, Tensor[] factors_b) -> ()");

  // Validation statistics of each Gram in one read, (len(grams), 4) float64: [max |G_ij − G_ji|, min diag,
  // max diag, number of non-finite entries], non-finite entries left out of the first three (a 1-D Gram is
  // its own diagonal).
  m.def("gram_stats(Tensor[] grams) -> Tensor");

  // rhs @ pinv(gram), batched over leading dims, for a symmetric PSD gram (..., n, n) or a diagonal (..., n).
  // Cholesky first; entries where it fails or is numerically singular fall back to an eigendecomposition
  // pseudo-inverse that drops eigenvalues with |λ| <= rcond·max|λ| (torch.pinverse's rule).
  m.def("psd_right_solve(Tensor rhs, Tensor gram, float rcond) -> Tensor");
}
