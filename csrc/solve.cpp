// psd_right_solve: rhs @ pinv(gram) for symmetric positive semi-definite Grams, batched over layers.
//
// Semantics are torch.pinverse's (the authors' solver): eigen/singular values with |λ| <= rcond·max|λ| are
// treated as zero. The fast path is a Cholesky solve (n³/3 FLOPs against roughly 10 n³ for an SVD). It is taken
// only where it gives that answer: for rcond <= kCholeskyRcond, where the eigenvalues such an rcond cuts are at
// the rounding level of λ_max and both answers are noise along them, and only for entries whose Cholesky
// succeeds with every pivot L_ii² > kCholeskyPivotTolerance · max_j G_jj (else G is singular to working
// precision). Every other entry, and every entry when rcond is larger, goes through an eigendecomposition
// pseudo-inverse. On the CPU the factorisation and the solve call LAPACK in place on one copy of G (no
// transposed copies, no zeroed triangle); elsewhere (CUDA: cuSOLVER) they go through ATen.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/ScalarType.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <cmath>

#include "checks.h"
#include "cpu/tiling.h"

// LAPACK as exported by torch's CPU library (MKL or OpenBLAS). Weak: a torch built without LAPACK leaves them
// null and the ATen path serves.
extern "C" {
void dpotrf_(const char* uplo, const int* n, double* a, const int* lda, int* info) __attribute__((weak));
void spotrf_(const char* uplo, const int* n, float* a, const int* lda, int* info) __attribute__((weak));
void dpotrs_(const char* uplo, const int* n, const int* nrhs, const double* a, const int* lda, double* b,
             const int* ldb, int* info) __attribute__((weak));
void spotrs_(const char* uplo, const int* n, const int* nrhs, const float* a, const int* lda, float* b, const int* ldb,
             int* info) __attribute__((weak));
}

namespace lorm_ext {
namespace {

constexpr const char* kOp = "lorm_ext::psd_right_solve";
constexpr double kCholeskyPivotTolerance = 1e-12;
constexpr double kCholeskyRcond = 1e-15;

// How rhs (..., m, n) pairs with gram: a full (..., n, n), a diagonal (..., n) (rhs has one more dim), or a
// diagonal written as (..., 1, n), which is never ambiguous.
enum class GramKind { kFull, kDiagonal, kDiagonalRow };

GramKind check_solve_args(const at::Tensor& rhs, const at::Tensor& gram, double rcond) {
  TORCH_CHECK(gram.scalar_type() == at::kFloat || gram.scalar_type() == at::kDouble, kOp,
              ": gram must be float32 or float64, got ", gram.scalar_type());
  TORCH_CHECK(at::isFloatingType(rhs.scalar_type()), kOp, ": rhs must be floating point, got ", rhs.scalar_type());
  TORCH_CHECK(rhs.device() == gram.device(), kOp, ": rhs is on ", rhs.device(), " but gram is on ", gram.device());
  TORCH_CHECK(std::isfinite(rcond) && rcond >= 0, kOp, ": rcond must be finite and >= 0, got ", rcond);
  TORCH_CHECK(gram.dim() >= 1, kOp, ": gram must have at least one dimension");
  TORCH_CHECK(rhs.dim() >= 2, kOp, ": rhs must be (..., m, n), got shape ", rhs.sizes());
  GramKind kind = GramKind::kFull;
  if (rhs.dim() == gram.dim() + 1) {
    kind = GramKind::kDiagonal;
    TORCH_CHECK(!(gram.dim() >= 2 && gram.size(-1) == gram.size(-2)), kOp, ": rhs ", rhs.sizes(), " with gram ",
                gram.sizes(), " is ambiguous: ", gram.size(-2),
                " diagonal Grams, or one full Gram for a batch of right-hand sides (not supported: give the Gram the "
                "batch dims of rhs); write diagonal Grams as (..., 1, n) to say which");
  } else {
    TORCH_CHECK(rhs.dim() == gram.dim() && gram.dim() >= 2, kOp,
                ": rhs must be (..., m, n) with gram (..., n, n), (..., 1, n) or a diagonal (..., n) of the same "
                "batch dims, got rhs ",
                rhs.sizes(), " and gram ", gram.sizes());
    if (gram.size(-2) == 1 && gram.size(-1) != 1) {
      kind = GramKind::kDiagonalRow;
    } else {
      TORCH_CHECK(gram.size(-1) == gram.size(-2), kOp,
                  ": gram must be (..., n, n), (..., 1, n) or a diagonal (..., n), got shape ", gram.sizes());
    }
  }
  const int64_t batch_dims = rhs.dim() - 2;
  TORCH_CHECK(rhs.sizes().slice(0, batch_dims) == gram.sizes().slice(0, batch_dims), kOp, ": batch dims differ: rhs ",
              rhs.sizes(), ", gram ", gram.sizes());
  TORCH_CHECK(rhs.size(-1) == gram.size(-1), kOp, ": rhs has ", rhs.size(-1), " columns but gram is for ",
              gram.size(-1), " features");
  return kind;
}

// The Cholesky factor reads one triangle only: an asymmetric Gram would be solved as a different matrix.
void check_symmetric(const at::Tensor& grams) {
  std::vector<at::Tensor> entries(grams.unbind(0));
  static const auto gram_stats =
      c10::Dispatcher::singleton().findSchemaOrThrow("lorm_ext::gram_stats", "").typed<at::Tensor(at::TensorList)>();
  const at::Tensor stats = gram_stats.call(entries).cpu();
  const auto s = stats.accessor<double, 2>();
  const double tolerance = symmetry_tolerance(grams.scalar_type());
  for (const auto i : c10::irange(stats.size(0))) {
    const double asymmetry = s[i][0], max_diagonal = s[i][2];
    TORCH_CHECK(s[i][3] == 0, kOp, ": gram ", i, " contains NaN or Inf");
    TORCH_CHECK(!exceeds_symmetry_tolerance(asymmetry, max_diagonal, grams.scalar_type()), kOp, ": gram ", i,
                " is not symmetric (max |G - Gᵀ| = ", asymmetry, " > ", tolerance, " · max diag); a Gram XᵀX is");
  }
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

// One entry of diagonal_pinv_solve on the CPU: the same operations (|g| against rcond · max |g|, NaN propagating,
// then rhs · (1 / g)), so the same bits, in one pass instead of eight ATen ops. `inverse`: n values of scratch.
template <typename scalar_t>
void diagonal_pinv_entry(const scalar_t* rhs, const scalar_t* g, scalar_t* out, int64_t m, int64_t n, double rcond,
                         scalar_t* inverse) {
  scalar_t largest = 0;
  for (int64_t j = 0; j < n && !std::isnan(largest); ++j) {
    const scalar_t magnitude = std::abs(g[j]);
    largest = std::isnan(magnitude) || magnitude > largest ? magnitude : largest;
  }
  const scalar_t threshold = static_cast<scalar_t>(rcond) * largest;
  for (int64_t j = 0; j < n; ++j) {
    inverse[j] = std::abs(g[j]) > threshold ? scalar_t(1) / g[j] : scalar_t(0);
  }
  for (int64_t i = 0; i < m * n; i += n) {
    for (int64_t j = 0; j < n; ++j) {
      out[i + j] = rhs[i + j] * inverse[j];
    }
  }
}

at::Tensor diagonal_pinv_solve(const at::Tensor& rhs, const at::Tensor& gram, double rcond) {
  if (rhs.is_cpu()) {
    const at::Tensor r = rhs.contiguous(), g = gram.contiguous();
    at::Tensor out = at::empty_like(r);
    const int64_t n = g.size(-1), m = r.size(-2);
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "psd_right_solve_diagonal", [&] {
      const scalar_t* rhs_data = r.const_data_ptr<scalar_t>();
      const scalar_t* gram_data = g.const_data_ptr<scalar_t>();
      scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, g.numel() / n, std::max<int64_t>(1, kMinParallelWork / (m * n)), [&](int64_t b0, int64_t b1) {
        std::vector<scalar_t> inverse(n);
        for (int64_t b = b0; b < b1; ++b) {
          diagonal_pinv_entry(rhs_data + b * m * n, gram_data + b * n, out_data + b * m * n, m, n, rcond,
                              inverse.data());
        }
      });
    });
    return out;
  }
  const at::Tensor magnitude = gram.abs();
  const at::Tensor keep = magnitude > rcond * magnitude.amax(-1, /*keepdim=*/true);
  const at::Tensor inverse = at::where(keep, gram.reciprocal(), at::zeros_like(gram));
  return rhs * inverse.unsqueeze(-2);
}

// Whether entry i's factor is usable: its pivots L_ii² against max_j G_jj (both read from the diagonals).
bool pivots_usable(const at::Tensor& factor_diagonal, const at::Tensor& gram_diagonal) {
  const double pivot = factor_diagonal.square().amin().item<double>();
  return pivot > kCholeskyPivotTolerance * gram_diagonal.amax().item<double>();
}

template <typename scalar_t>
void lapack_potrf(int n, scalar_t* a, int* info) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    dpotrf_("L", &n, a, &n, info);
  } else {
    spotrf_("L", &n, a, &n, info);
  }
}

template <typename scalar_t>
void lapack_potrs(int n, int nrhs, const scalar_t* a, scalar_t* b, int* info) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    dpotrs_("L", &n, &nrhs, a, &n, b, &n, info);
  } else {
    spotrs_("L", &n, &nrhs, a, &n, b, &n, info);
  }
}

bool have_lapack() {
  return dpotrf_ != nullptr && spotrf_ != nullptr && dpotrs_ != nullptr && spotrs_ != nullptr;
}

// CPU: per entry, LAPACK on one copy of G. A row-major symmetric G is its own column-major layout, and a
// row-major rhs (m, n) is rhsᵀ column-major: potrs solves G Xᵀ = rhsᵀ in place, which is X G = rhs. A batch of
// at least as many entries as threads is solved an entry per thread (LAPACK single-threaded inside, which for
// the widths of a model's layers is faster than one multithreaded factorisation after another), in whole rounds;
// the rest entry by entry with LAPACK's own threads. At one thread both are the same calls.
at::Tensor cholesky_solve_cpu(const at::Tensor& b, const at::Tensor& g, at::Tensor& usable) {
  at::Tensor out = b.clone(at::MemoryFormat::Contiguous);
  const int64_t entries = g.size(0), threads = at::get_num_threads();
  // Whole rounds of one entry per thread; the entries left over, fewer than the threads, one by one on LAPACK's
  // own threads.
  const int64_t per_thread_entries = threads > 1 ? entries - entries % threads : 0;
  at::Tensor factors = at::empty({per_thread_entries > 0 ? threads : 1, g.size(1), g.size(2)}, g.options());
  const int n = static_cast<int>(g.size(-1)), m = static_cast<int>(b.size(-2));
  bool* ok = usable.mutable_data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "psd_right_solve_lapack", [&] {
    const auto solve_entry = [&](int64_t i, at::Tensor factor) {
      factor.copy_(g[i]);
      int info = 0;
      lapack_potrf<scalar_t>(n, factor.mutable_data_ptr<scalar_t>(), &info);
      ok[i] = info == 0 && pivots_usable(factor.diagonal(), g[i].diagonal());
      if (ok[i]) {
        lapack_potrs<scalar_t>(n, m, factor.const_data_ptr<scalar_t>(), out[i].mutable_data_ptr<scalar_t>(), &info);
        TORCH_INTERNAL_ASSERT(info == 0, kOp, ": potrs failed with info ", info);
      }
    };
    pull_tasks(per_thread_entries, per_thread_entries * n * n * n / 3,
               [&](int64_t i) { solve_entry(i, factors[at::get_thread_num()]); });
    for (int64_t i = per_thread_entries; i < entries; ++i) {
      solve_entry(i, factors[0]);
    }
  });
  return out;
}

// Other devices: the batched ATen factorisation and solve (cuSOLVER on CUDA).
at::Tensor cholesky_solve_aten(const at::Tensor& b, const at::Tensor& g, at::Tensor& usable) {
  auto [factor, info] = at::linalg_cholesky_ex(g, /*upper=*/false, /*check_errors=*/false);
  const at::Tensor pivots = factor.diagonal(0, -2, -1).square().amin(-1);
  const at::Tensor scale = g.diagonal(0, -2, -1).amax(-1);
  usable = info.eq(0).logical_and(pivots > kCholeskyPivotTolerance * scale).cpu();
  // X G = B  <=>  G Xᵀ = Bᵀ (G symmetric).
  return at::cholesky_solve(b.mT(), factor, /*upper=*/false).mT().contiguous();
}

at::Tensor full_solve(const at::Tensor& rhs, const at::Tensor& gram, double rcond) {
  const int64_t n = gram.size(-1), m = rhs.size(-2);
  const at::Tensor g = gram.reshape({-1, n, n}).contiguous();
  const at::Tensor b = rhs.reshape({-1, m, n});
  check_symmetric(g);
  if (rcond > kCholeskyRcond) {
    return eigh_pinv_solve(b, g, rcond).reshape(rhs.sizes());
  }
  at::Tensor usable = at::zeros({g.size(0)}, at::kBool);
  at::Tensor out = g.is_cpu() && have_lapack() && n <= INT32_MAX && m <= INT32_MAX ? cholesky_solve_cpu(b, g, usable)
                                                                                   : cholesky_solve_aten(b, g, usable);
  if (!usable.all().item<bool>()) {
    const at::Tensor fallback = usable.logical_not().nonzero().squeeze(-1).to(g.device());
    out.index_copy_(0, fallback, eigh_pinv_solve(b.index_select(0, fallback), g.index_select(0, fallback), rcond));
  }
  return out.reshape(rhs.sizes());
}

at::Tensor psd_right_solve(const at::Tensor& rhs_in, const at::Tensor& gram_in, double rcond) {
  const GramKind kind = check_solve_args(rhs_in, gram_in, rcond);
  const at::Tensor gram = gram_in.detach();
  const at::Tensor rhs = rhs_in.detach().to(gram.scalar_type());
  if (rhs.numel() == 0) {
    return at::zeros_like(rhs);
  }
  switch (kind) {
    case GramKind::kDiagonal: return diagonal_pinv_solve(rhs, gram, rcond);
    case GramKind::kDiagonalRow: return diagonal_pinv_solve(rhs, gram.squeeze(-2), rcond);
    case GramKind::kFull: return full_solve(rhs, gram, rcond);
  }
  TORCH_INTERNAL_ASSERT(false, kOp, ": unknown Gram kind");
}

}  // namespace

TORCH_LIBRARY_IMPL(lorm_ext, CPU, m) {
  m.impl("psd_right_solve", &psd_right_solve);
}

TORCH_LIBRARY_IMPL(lorm_ext, CUDA, m) {
  m.impl("psd_right_solve", &psd_right_solve);
}

}  // namespace lorm_ext
