// CPU Gram accumulation: G += XᵀX in place.
//
// Full Grams: the upper triangle is computed by recursive halving: G[a, a] and G[b, b] recursively, G[a, b] as one
// GEMM X[:, a]ᵀ X[:, b] whose transpose also goes into G[b, a]; blocks at most leaf_width wide are one GEMM. About
// half the FLOPs of a full XᵀX, in few large GEMMs that BLAS runs at its multithreaded rate (many small
// single-threaded tile GEMMs inside a parallel loop lose that rate, and collapse when a vCPU is taken away). The
// update is exactly symmetric: a symmetric G stays so. 16-bit inputs (and float32 into a float64 G) are upcast a
// bounded chunk of rows at a time. Diagonal Grams: column sums of squares accumulated in double.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "tiling.h"

namespace lorm_ext {
namespace {

// Bytes of upcast rows of X held at once, and of one GEMM's product: bounds the op's scratch memory.
constexpr int64_t kScratchBytes = int64_t{64} << 20;
// Columns per diagonal task: enough contiguous work per row to amortise the strided walk down X.
constexpr int64_t kDiagonalGrain = 64;
// Split points are multiples of this, so that GEMM operands start on cache-line and vector boundaries.
constexpr int64_t kSplitAlign = 64;

// Diagonal blocks this wide or narrower are one full GEMM (half of it wasted); wider ones are halved. Each halving
// saves FLOPs but makes the GEMMs smaller: with more threads a GEMM must be larger to keep them all busy.
int64_t leaf_width() {
  return at::get_num_threads() > 1 ? 384 : 256;
}

// A GEMM product of rows × cols in the scratch buffer (reused: no allocation or page faults per GEMM).
at::Tensor product_view(at::Tensor& scratch, int64_t rows, int64_t cols) {
  return scratch.narrow(0, 0, rows * cols).view({rows, cols});
}

// G[lo + r, lo + c] += S[r, c] for r <= c, mirrored into G[lo + c, lo + r]: the diagonal block's update made
// exactly symmetric (GEMM rounding may differ between S[r, c] and S[c, r]).
template <typename scalar_t>
void add_mirrored(const at::Tensor& gram, const at::Tensor& product, int64_t lo) {
  const int64_t n = gram.size(0), w = product.size(0);
  scalar_t* g = gram.mutable_data_ptr<scalar_t>() + lo * n + lo;
  const scalar_t* s = product.const_data_ptr<scalar_t>();
  for (int64_t r = 0; r < w; ++r) {
    g[r * n + r] += s[r * w + r];
    for (int64_t c = r + 1; c < w; ++c) {
      const scalar_t v = s[r * w + c];
      g[r * n + c] += v;
      g[c * n + r] += v;
    }
  }
}

// G[lo:hi, lo:hi] += X[:, lo:hi]ᵀ X[:, lo:hi], computing only upper-triangle blocks.
void accumulate_block(const at::Tensor& gram, const at::Tensor& x, int64_t lo, int64_t hi, at::Tensor& scratch) {
  const int64_t width = hi - lo;
  if (width <= leaf_width()) {
    const at::Tensor xs = x.narrow(1, lo, width);
    at::Tensor product = product_view(scratch, width, width);
    at::mm_out(product, xs.t(), xs);
    AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "gram_add_mirrored", [&] {
      add_mirrored<scalar_t>(gram, product, lo);
    });
    return;
  }
  const int64_t mid = lo + ceil_div(width / 2, kSplitAlign) * kSplitAlign;
  accumulate_block(gram, x, lo, mid, scratch);
  // G[lo:mid, mid:hi] += X[:, lo:mid]ᵀ X[:, mid:hi], in column chunks that fit the scratch buffer.
  const int64_t rows = mid - lo;
  const int64_t chunk = std::max<int64_t>(kSplitAlign, scratch.numel() / rows / kSplitAlign * kSplitAlign);
  const at::Tensor left = x.narrow(1, lo, rows).t();
  for (int64_t c0 = mid; c0 < hi; c0 += chunk) {
    const int64_t cols = std::min(chunk, hi - c0);
    at::Tensor product = product_view(scratch, rows, cols);
    at::mm_out(product, left, x.narrow(1, c0, cols));
    gram.narrow(0, lo, rows).narrow(1, c0, cols).add_(product);
    gram.narrow(0, c0, cols).narrow(1, lo, rows).add_(product.t());
  }
  accumulate_block(gram, x, mid, hi, scratch);
}

void accumulate_full(const at::Tensor& gram, const at::Tensor& x) {
  const int64_t n = gram.size(0);
  const int64_t rows = x.size(0);
  const auto dtype = gram.scalar_type();
  const int64_t element = static_cast<int64_t>(at::elementSize(dtype));
  const int64_t half = ceil_div(n, 2 * kSplitAlign) * kSplitAlign;  // the largest off-diagonal block's rows
  const int64_t leaf = std::min(n, leaf_width());
  const int64_t scratch_elements =
      std::max(leaf * leaf, std::min(half * (n - half), std::max(kScratchBytes / element, half * kSplitAlign)));
  at::Tensor scratch = at::empty({scratch_elements}, gram.options());
  if (x.scalar_type() == dtype) {
    accumulate_block(gram, x, 0, n, scratch);
    return;
  }
  const int64_t row_chunk = std::max<int64_t>(1, kScratchBytes / (element * n));
  for (int64_t r0 = 0; r0 < rows; r0 += row_chunk) {
    accumulate_block(gram, x.narrow(0, r0, std::min(row_chunk, rows - r0)).to(dtype), 0, n, scratch);
  }
}

template <typename input_t, typename gram_t>
void accumulate_diagonal_typed(const at::Tensor& gram, const at::Tensor& x) {
  const int64_t n = gram.size(0);
  const int64_t rows = x.size(0);
  const int64_t row_stride = x.stride(0);
  const int64_t col_stride = x.stride(1);
  const input_t* data = x.const_data_ptr<input_t>();
  gram_t* out = gram.mutable_data_ptr<gram_t>();
  at::parallel_for(0, n, kDiagonalGrain, [&](int64_t c0, int64_t c1) {
    std::vector<double> sums(c1 - c0, 0.0);
    for (int64_t r = 0; r < rows; ++r) {
      const input_t* row = data + r * row_stride;
      if (col_stride == 1) {
        for (int64_t c = c0; c < c1; ++c) {
          const double v = static_cast<double>(row[c]);
          sums[c - c0] += v * v;
        }
      } else {
        for (int64_t c = c0; c < c1; ++c) {
          const double v = static_cast<double>(row[c * col_stride]);
          sums[c - c0] += v * v;
        }
      }
    }
    for (int64_t c = c0; c < c1; ++c) {
      out[c] = static_cast<gram_t>(static_cast<double>(out[c]) + sums[c - c0]);
    }
  });
}

void accumulate_diagonal(const at::Tensor& gram, const at::Tensor& x) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gram_accumulate_diagonal", [&] {
    using input_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "gram_accumulate_diagonal_out", [&] {
      accumulate_diagonal_typed<input_t, scalar_t>(gram, x);
    });
  });
}

void gram_accumulate_cpu(at::TensorList grams, at::TensorList inputs) {
  check_gram_accumulate_args(grams, inputs);
  for (size_t i = 0; i < grams.size(); ++i) {
    const at::Tensor gram = grams[i].detach();
    if (gram.numel() == 0 || inputs[i].numel() == 0) {
      continue;
    }
    const at::Tensor x = inputs[i].detach().reshape({-1, gram.size(0)});
    if (is_diagonal_gram(gram)) {
      accumulate_diagonal(gram, x);
    } else {
      accumulate_full(gram, x);
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(lorm_ext, CPU, m) {
  m.impl("gram_accumulate_", &gram_accumulate_cpu);
}

}  // namespace lorm_ext
