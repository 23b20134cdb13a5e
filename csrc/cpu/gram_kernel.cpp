// CPU Gram accumulation: G += XᵀX in place, upcasting X tile by tile (never a full-precision copy of X).
//
// Full Grams: the upper triangle of (tile_i, tile_j) blocks is split over threads with at::parallel_for;
// each task runs single-threaded BLAS GEMMs over row chunks into a private tile, then adds the tile and its
// transpose into G. Half the FLOPs of a full XᵀX, and the update is exactly symmetric: a symmetric G stays so. Diagonal Grams: column sums of squares accumulated in double, one column range per task.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "../checks.h"
#include "tiling.h"

namespace lorm_ext {
namespace {

// Rows of X upcast at a time when X's dtype differs from G's: bounds each thread's scratch memory.
constexpr int64_t kRowChunk = 1024;
// Columns per diagonal task: enough contiguous work per row to amortise the strided walk down X.
constexpr int64_t kDiagonalGrain = 64;

void accumulate_full(const at::Tensor& gram, const at::Tensor& x) {
  const int64_t n = gram.size(0);
  const int64_t rows = x.size(0);
  const auto dtype = gram.scalar_type();
  const bool same_dtype = x.scalar_type() == dtype;
  // With X already in G's dtype one GEMM covers all rows; otherwise rows are upcast a chunk at a time.
  const int64_t row_chunk = same_dtype ? std::max<int64_t>(rows, 1) : kRowChunk;
  const int64_t tile = tile_width(n);
  const auto pairs = upper_triangle_tiles(n, tile);

  at::parallel_for(0, static_cast<int64_t>(pairs.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const auto& [bi, bj] = pairs[p];
      const int64_t i0 = bi * tile, j0 = bj * tile;
      const int64_t ti = std::min(tile, n - i0), tj = std::min(tile, n - j0);
      at::Tensor block = at::zeros({ti, tj}, gram.options());
      for (int64_t r0 = 0; r0 < rows; r0 += row_chunk) {
        const int64_t rc = std::min(row_chunk, rows - r0);
        const at::Tensor chunk = x.narrow(0, r0, rc);
        const at::Tensor xi = chunk.narrow(1, i0, ti).to(dtype);
        const at::Tensor xj = bi == bj ? xi : chunk.narrow(1, j0, tj).to(dtype);
        block.addmm_(xi.t(), xj);
      }
      if (bi == bj) {
        // GEMM rounding may differ between (a, b) and (b, a): mirror the upper half so the update is symmetric.
        block = at::triu(block) + at::triu(block, 1).t();
      } else {
        gram.narrow(0, j0, tj).narrow(1, i0, ti).add_(block.t());
      }
      gram.narrow(0, i0, ti).narrow(1, j0, tj).add_(block);
    }
  });
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
