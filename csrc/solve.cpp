// psd_right_solve: rhs @ pinv(gram) for symmetric positive semi-definite Grams, batched over layers.
//
// Semantics are torch.pinverse's (the authors' solver): eigen/singular values with |λ| <= rcond·max|λ| are
// treated as zero. The fast path is a batched Cholesky solve (n³/3 FLOPs against roughly 10 n³ for an SVD).
// A batch entry falls back to an eigendecomposition pseudo-inverse when Cholesky fails, or when a pivot
// satisfies L_ii² <= kCholeskyPivotTolerance · max_j G_jj: then G is singular to working precision and only
// the pseudo-inverse defines the answer. The code is ATen only, so one implementation serves every device
// (on CUDA, cuSOLVER through ATen).
#include <ATen/ATen.h>
#include <torch/library.h>

namespace lorm_ext {
namespace {

constexpr double kCholeskyPivotTolerance = 1e-12;

void check_solve_args(const at::Tensor& rhs, const at::Tensor& gram) {
  constexpr const char* op = "lorm_ext::psd_right_solve";
  TORCH_CHECK(
      gram.scalar_type() == at::kFloat || gram.scalar_type() == at::kDouble,
      op, ": gram must be float32 or float64, got ", gram.scalar_type());
  TORCH_CHECK(at::isFloatingType(rhs.scalar_type()), op, ": rhs must be floating point, got ", rhs.scalar_type());
  TORCH_CHECK(rhs.device() == gram.device(), op, ": rhs is on ", rhs.device(), " but gram is on ", gram.device());
  TORCH_CHECK(gram.dim() >= 1, op, ": gram must have at least one dimension");
  const bool diagonal = rhs.dim() == gram.dim() + 1;
  if (!diagonal) {
    TORCH_CHECK(
        gram.dim() >= 2 && gram.size(-1) == gram.size(-2),
        op, ": gram must be (..., n, n) or a diagonal (..., n), got shape ", gram.sizes());
    TORCH_CHECK(
        rhs.dim() == gram.dim(),
        op, ": rhs must be (..., m, n) with the batch dims of gram, got rhs ", rhs.sizes(), " and gram ",
        gram.sizes());
  }
  const int64_t batch_dims = rhs.dim() - 2;
  TORCH_CHECK(
      rhs.sizes().slice(0, batch_dims) == gram.sizes().slice(0, batch_dims),
      op, ": batch dims differ: rhs ", rhs.sizes(), ", gram ", gram.sizes());
  TORCH_CHECK(
      rhs.size(-1) == gram.size(-1),
      op, ": rhs has ", rhs.size(-1), " columns but gram is for ", gram.size(-1), " features");
}

// The pseudo-inverse through eigh: for symmetric G the singular values are |λ|, so dropping
// |λ| <= rcond·max|λ| is exactly torch.pinverse's cut.
at::Tensor eigh_pinv_solve(const at::Tensor& rhs, const at::Tensor& gram, double rcond) {
  auto [eigenvalues, eigenvectors] = at::linalg_eigh(gram);
  const at::Tensor magnitude = eigenvalues.abs();
  const at::Tensor keep = magnitude > rcond * magnitude.amax(-1, /*keepdim=*/true);
  const at::Tensor inverse = at::where(keep, eigenvalues.reciprocal(), at::zeros_like(eigenvalues));
  return at::matmul(at::matmul(rhs, eigenvectors) * inverse.unsqueeze(-2), eigenvectors.mT());
}

at::Tensor diagonal_pinv_solve(const at::Tensor& rhs, const at::Tensor& gram, double rcond) {
  const at::Tensor magnitude = gram.abs();
  const at::Tensor keep = magnitude > rcond * magnitude.amax(-1, /*keepdim=*/true);
  const at::Tensor inverse = at::where(keep, gram.reciprocal(), at::zeros_like(gram));
  return rhs * inverse.unsqueeze(-2);
}

at::Tensor psd_right_solve(const at::Tensor& rhs_in, const at::Tensor& gram_in, double rcond) {
  check_solve_args(rhs_in, gram_in);
  const at::Tensor gram = gram_in.detach();
  const at::Tensor rhs = rhs_in.detach().to(gram.scalar_type());
  if (rhs.numel() == 0) {
    return at::zeros_like(rhs);
  }
  if (rhs.dim() == gram.dim() + 1) {
    return diagonal_pinv_solve(rhs, gram, rcond);
  }
  const int64_t n = gram.size(-1);
  const int64_t m = rhs.size(-2);
  const at::Tensor g = gram.reshape({-1, n, n});
  const at::Tensor b = rhs.reshape({-1, m, n});

  auto [factor, info] = at::linalg_cholesky_ex(g, /*upper=*/false, /*check_errors=*/false);
  const at::Tensor pivots = factor.diagonal(0, -2, -1).square().amin(-1);
  const at::Tensor scale = g.diagonal(0, -2, -1).amax(-1);
  const at::Tensor usable = info.eq(0).logical_and(pivots > kCholeskyPivotTolerance * scale);
  // X G = B  <=>  G Xᵀ = Bᵀ (G symmetric).
  at::Tensor out = at::cholesky_solve(b.mT(), factor, /*upper=*/false).mT().contiguous();
  if (!usable.all().item<bool>()) {
    const at::Tensor fallback = usable.logical_not().nonzero().squeeze(-1);
    out.index_copy_(0, fallback, eigh_pinv_solve(b.index_select(0, fallback), g.index_select(0, fallback), rcond));
  }
  return out.reshape(rhs.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(lorm_ext, CPU, m) {
  m.impl("psd_right_solve", &psd_right_solve);
}

TORCH_LIBRARY_IMPL(lorm_ext, CUDA, m) {
  m.impl("psd_right_solve", &psd_right_solve);
}

}  // namespace lorm_ext
