// CPU Gram accumulation: G += XᵀX in place.
//
// Full Grams: only the upper triangle is computed, as the blocks of a recursive halving (G[a, a] and G[b, b]
// halved again, G[a, b] one off-diagonal block; diagonal blocks at most kLeafWidth wide are one full GEMM), about
// half the FLOPs of a full XᵀX. The blocks, the off-diagonal ones cut into tiles, are independent GEMM tasks that
// the threads pull from one queue, largest first, each task a single-threaded BLAS GEMM into a per-thread scratch
// added to its block and mirrored into the transposed block (tiling.h's pull_tasks). A Gram with too few tasks to
// keep the threads busy (a narrow one) splits X's rows between the threads instead: every task on each chunk of
// rows, the chunks' products summed in chunk order.
// The update is exactly symmetric: a symmetric G stays so. 16-bit inputs (and float32 into a float64 G) are
// upcast a bounded chunk of rows at a time. Diagonal Grams: column sums of squares accumulated in double.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "blas.h"
#include "tiling.h"

namespace lorm_ext {
namespace {

// Bytes of upcast rows of X held at once: bounds the op's scratch memory.
constexpr int64_t kUpcastBytes = int64_t{64} << 20;
// Columns per diagonal task: enough contiguous work per row to amortise the strided walk down X.
constexpr int64_t kDiagonalGrain = 64;
// Diagonal blocks at most this wide are one full GEMM (half of it wasted); wider ones are halved. A Gram narrower
// than twice this is still halved once while its halves stay at least kMinLeafWidth wide (see bench/README.md).
constexpr int64_t kLeafWidth = 128;
constexpr int64_t kMinLeafWidth = 32;
// Off-diagonal blocks are cut into tiles at most this wide: GEMMs near BLAS's rate, tasks small enough to balance.
constexpr int64_t kTileWidth = 512;
// Split points are multiples of this, so that GEMM operands start on cache-line and vector boundaries.
constexpr int64_t kSplitAlign = 32;
// With fewer tasks than this per thread, the threads split X's rows instead (chunks at least kMinChunkRows long).
constexpr int64_t kTasksPerThread = 2;
constexpr int64_t kMinChunkRows = 256;

// One GEMM task: G[row0:row0+rows, col0:col0+cols] += X[:, rows]ᵀ X[:, cols], and the same into the transposed
// block. A diagonal task (row0 == col0) adds the upper triangle of its product and mirrors it.
struct GemmTask {
  int64_t row0, rows, col0, cols;
  bool diagonal() const {
    return row0 == col0;
  }
  int64_t cost() const {
    return rows * cols;
  }
};

void plan_block(int64_t lo, int64_t hi, int64_t leaf, std::vector<GemmTask>& tasks) {
  const int64_t width = hi - lo;
  if (width <= leaf) {
    tasks.push_back({lo, width, lo, width});
    return;
  }
  const int64_t mid = lo + ceil_div(width / 2, kSplitAlign) * kSplitAlign;
  plan_block(lo, mid, leaf, tasks);
  for (int64_t r0 = lo; r0 < mid; r0 += kTileWidth) {
    for (int64_t c0 = mid; c0 < hi; c0 += kTileWidth) {
      tasks.push_back({r0, std::min(kTileWidth, mid - r0), c0, std::min(kTileWidth, hi - c0)});
    }
  }
  plan_block(mid, hi, leaf, tasks);
}

// The upper triangle of an n-wide Gram as GEMM tasks, largest first (so the last tasks pulled are small ones).
std::vector<GemmTask> plan_tasks(int64_t n) {
  const int64_t leaf =
      n >= 2 * kLeafWidth ? kLeafWidth : std::max(kMinLeafWidth, ceil_div(n / 2, kSplitAlign) * kSplitAlign);
  std::vector<GemmTask> tasks;
  plan_block(0, n, leaf, tasks);
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const GemmTask& a, const GemmTask& b) { return a.cost() > b.cost(); });
  return tasks;
}

// G[row0 + r, col0 + c] += S[r, c] and G[col0 + c, row0 + r] += S[r, c] (S row-major, ld apart; a diagonal task:
// r <= c only, the diagonal once), in kMirrorBlock-square blocks so that the mirrored writes stay within a few cache
// lines.
constexpr int64_t kMirrorBlock = 16;
template <typename scalar_t>
void add_mirrored(scalar_t* g, int64_t n, const scalar_t* s, int64_t ld, const GemmTask& task) {
  const bool diagonal = task.diagonal();
  for (int64_t r0 = 0; r0 < task.rows; r0 += kMirrorBlock) {
    const int64_t r1 = std::min(task.rows, r0 + kMirrorBlock);
    for (int64_t c0 = diagonal ? r0 : 0; c0 < task.cols; c0 += kMirrorBlock) {
      const int64_t c1 = std::min(task.cols, c0 + kMirrorBlock);
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* row = g + (task.row0 + r) * n + task.col0;
        for (int64_t c = diagonal ? std::max(c0, r) : c0; c < c1; ++c) {
          row[c] += s[r * ld + c];
        }
      }
      for (int64_t c = c0; c < c1; ++c) {
        scalar_t* row = g + (task.col0 + c) * n + task.row0;
        for (int64_t r = r0; r < (diagonal ? std::min(r1, c) : r1); ++r) {
          row[r] += s[r * ld + c];
        }
      }
    }
  }
}

// Scratch for a thread's GEMM products (at most kTileWidth² or a leaf's), kept between calls: a fresh buffer would
// be page-faulted in on every call, which costs as much as a small Gram's GEMM.
template <typename scalar_t>
scalar_t* product_scratch(int64_t elements) {
  thread_local std::vector<scalar_t> kept;
  return aligned_scratch(kept, elements);
}

// S (rows × cols, row-major, ld apart) = X[:, rows]ᵀ X[:, cols] over the given rows of X: column-major, one
// gemm('N', 'T') (the call at::mm_out makes, without its dispatch); X with strided columns goes through at::mm_out.
template <typename scalar_t>
void task_product(const at::Tensor& x, const GemmTask& task, scalar_t* s, int64_t ld) {
  const bool unit_columns = x.stride(1) == 1 && x.stride(0) >= x.size(1);
  const scalar_t* data = x.const_data_ptr<scalar_t>();
  if (!unit_columns || !blas_gemm<scalar_t>('N', 'T', task.cols, task.rows, x.size(0), data + task.col0, x.stride(0),
                                            data + task.row0, x.stride(0), scalar_t(0), s, ld)) {
    at::Tensor product = at::from_blob(s, {task.rows, task.cols}, {ld, 1}, x.options());
    at::mm_out(product, x.narrow(1, task.row0, task.rows).t(), x.narrow(1, task.col0, task.cols));
  }
}

// What the tasks cost on X's rows.
int64_t multiply_adds(const at::Tensor& x, const std::vector<GemmTask>& tasks) {
  int64_t per_row = 0;
  for (const GemmTask& task : tasks) {
    per_row += task.cost();
  }
  return per_row * x.size(0);
}

// Each task on all rows of X, the threads pulling tasks.
template <typename scalar_t>
void run_tasks(const at::Tensor& gram, const at::Tensor& x, const std::vector<GemmTask>& tasks) {
  pull_tasks(static_cast<int64_t>(tasks.size()), multiply_adds(x, tasks), [&](int64_t t) {
    const GemmTask& task = tasks[t];
    scalar_t* s = product_scratch<scalar_t>(task.rows * task.cols);
    task_product<scalar_t>(x, tasks[t], s, task.cols);
    add_mirrored<scalar_t>(gram.mutable_data_ptr<scalar_t>(), gram.size(0), s, task.cols, task);
  });
}

// Every task on one chunk of X's rows per thread, each chunk into its own n × n scratch; the chunks' products are
// then summed in chunk order and added once. For Grams with too few tasks to keep the threads busy.
template <typename scalar_t>
void run_row_chunks(const at::Tensor& gram, const at::Tensor& x, const std::vector<GemmTask>& tasks, int64_t chunks) {
  const int64_t n = gram.size(0);
  const int64_t rows = x.size(0);
  const int64_t stride = aligned_count<scalar_t>(n * n);
  thread_local std::vector<scalar_t> kept;
  scalar_t* products = aligned_scratch(kept, chunks * stride);
  pull_tasks(chunks, multiply_adds(x, tasks), [&](int64_t c) {
    const int64_t r0 = rows * c / chunks, r1 = rows * (c + 1) / chunks;
    for (const GemmTask& task : tasks) {
      task_product<scalar_t>(x.narrow(0, r0, r1 - r0), task, products + c * stride + task.row0 * n + task.col0, n);
    }
  });
  for (const GemmTask& task : tasks) {
    scalar_t* total = products + task.row0 * n + task.col0;
    for (int64_t c = 1; c < chunks; ++c) {
      const scalar_t* part = products + c * stride + task.row0 * n + task.col0;
      for (int64_t r = 0; r < task.rows; ++r) {
        for (int64_t k = 0; k < task.cols; ++k) {
          total[r * n + k] += part[r * n + k];
        }
      }
    }
    add_mirrored<scalar_t>(gram.mutable_data_ptr<scalar_t>(), n, total, n, task);
  }
}

// Splits the tasks between the threads, or, when there are too few of them to balance, X's rows.
void run(const at::Tensor& gram, const at::Tensor& x, const std::vector<GemmTask>& tasks) {
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = std::min(threads, x.size(0) / kMinChunkRows);
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "gram_accumulate_tasks", [&] {
    if (chunks > 1 && static_cast<int64_t>(tasks.size()) < kTasksPerThread * threads) {
      run_row_chunks<scalar_t>(gram, x, tasks, chunks);
    } else {
      run_tasks<scalar_t>(gram, x, tasks);
    }
  });
}

void accumulate_full(const at::Tensor& gram, const at::Tensor& x) {
  const auto dtype = gram.scalar_type();
  const std::vector<GemmTask> tasks = plan_tasks(gram.size(0));
  if (x.scalar_type() == dtype) {
    run(gram, x, tasks);
    return;
  }
  const int64_t rows = x.size(0);
  const int64_t row_chunk =
      std::max<int64_t>(1, kUpcastBytes / (static_cast<int64_t>(at::elementSize(dtype)) * gram.size(0)));
  for (int64_t r0 = 0; r0 < rows; r0 += row_chunk) {
    run(gram, x.narrow(0, r0, std::min(row_chunk, rows - r0)).to(dtype), tasks);
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
    AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "gram_accumulate_diagonal_out",
                               [&] { accumulate_diagonal_typed<input_t, scalar_t>(gram, x); });
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
