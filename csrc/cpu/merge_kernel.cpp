// CPU streaming merge accumulators: one pass over each client Gram.
//
// Each layer's Gram is read in one of two ways, whichever keeps the products in cache:
//   row chunks (when the p × n product F G fits in kProductBytes): a task walks chunk rows [i0, i0+kChunkRows)
//     of G a block of rows at a time, each block a contiguous stretch of memory: it upcasts the block to the
//     accumulator dtype, adds it into ΣG when the op keeps one, and accumulates F[:, rows] G[rows, :] into the
//     chunk's p × n product with one single-threaded BLAS GEMM. Chunk products are added in chunk order.
//   column panels (wider products): a task walks all rows of G[:, c0:c0+w] the same way into a p × w product.
// Diagonal Grams are panels too, one elementwise sweep. Tasks are pulled from one queue, largest first; each
// writes only its own product and its own part of ΣG, so the result does not depend on the threads. The B-step's
// P = A G Aᵀ is finished inside each task (an r × r partial per task), so A G is never stored; its out × r
// products B_k P_k run in row kernels at small r and through at::addmm above.
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

// Column panels: rows of G upcast per GEMM, so that the (rows × w) block stays in L2 next to the p × w product.
constexpr int64_t kBlockRows = 256;
// Panel width: the p × w product stays within ~256 KiB (L2) and w is a multiple of the vector width.
int64_t panel_width(int64_t p, size_t acc_size) {
  const int64_t fit = static_cast<int64_t>((256 * 1024) / (std::max<int64_t>(p, 1) * acc_size));
  return std::clamp<int64_t>(fit / 16 * 16, 16, 256);
}

// Row chunks: taken when the p × n product fits in kProductBytes; a block of upcast rows is at most
// kRowBlockBytes (both in L2 together), and kChunkRows rows make one task.
constexpr int64_t kProductBytes = int64_t{512} << 10;
constexpr int64_t kRowBlockBytes = int64_t{512} << 10;
constexpr int64_t kChunkRows = 512;

bool uses_row_chunks(int64_t n, int64_t p, size_t acc_size) {
  return p * n * static_cast<int64_t>(acc_size) <= kProductBytes;
}

// Rows per block of a row chunk: a power of two from 8 to kBlockRows (a Gram of up to kBlockRows rows whose
// product fits is then one block, the same GEMM as its one panel).
int64_t row_block_rows(int64_t n, size_t acc_size) {
  int64_t rows = kBlockRows;
  while (rows > 8 && rows * n * static_cast<int64_t>(acc_size) > kRowBlockBytes) {
    rows /= 2;
  }
  return rows;
}

// acc (p × w, row-major) += f (p × h, row leading dimension ldf) · rows (h × w, row-major), single-threaded.
// In BLAS's column-major terms that is accᵀ += rowsᵀ fᵀ, so no operand is transposed.
template <typename acc_t>
void multiply_add(acc_t* acc, const acc_t* f, int64_t ldf, const acc_t* rows, int64_t p, int64_t h, int64_t w) {
  if (blas_gemm<acc_t>('N', 'N', w, p, h, rows, w, f, ldf, acc_t(1), acc, w)) {
    return;
  }
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor out = at::from_blob(acc, {p, w}, options);
  out.addmm_(at::from_blob(const_cast<acc_t*>(f), {p, h}, {ldf, 1}, options),
             at::from_blob(const_cast<acc_t*>(rows), {h, w}, options));
}

// The small per-layer matrices in the accumulator's dtype, contiguous (no copy when already so).
at::Tensor as_accumulator(const at::Tensor& t, const at::Tensor& accumulator) {
  return t.detach().to(accumulator.scalar_type()).contiguous();
}

// B_k as the row kernels read it: float32 and float64 as they are, other dtypes in the accumulator's.
at::Tensor as_row_factor(const at::Tensor& t, const at::Tensor& accumulator) {
  const auto dtype = t.scalar_type();
  return dtype == at::kFloat || dtype == at::kDouble ? t.detach().contiguous() : as_accumulator(t, accumulator);
}

// F as a layer's pass reads it (see LayerPass).
at::Tensor pass_factor(const at::Tensor& factor, const at::Tensor& gram, const at::Tensor& accumulator) {
  return is_diagonal_gram(gram) ? as_row_factor(factor, accumulator) : as_accumulator(factor, accumulator);
}

// One layer of a call: its Gram; the factor F (p × n, contiguous; of a full Gram in the acc dtype, an operand of
// the GEMMs; of a diagonal Gram float32 or float64 as sent, so that no per-call copy is made: see pass_factor);
// the Gram sum (acc dtype, shaped like the Gram; undefined: none kept); the accumulation dtype (the sums'); and
// where the products go, one of two (the other undefined), both in the acc dtype:
//   out       p × n: F G is added to it;
//   partials  (tasks × p × p): task t writes its share of F G Fᵀ (a chunk: (F[:, rows] G[rows, :]) Fᵀ; a panel:
//             (F G)[:, panel] F[:, panel]ᵀ), so F G Fᵀ is their sum and F G is never stored (the B-step).
// A layer read in row chunks with an out also has chunk_products (tasks × p × n), added into out in chunk order.
struct LayerPass {
  at::Tensor gram;
  at::Tensor factor;
  at::Tensor gram_sum;
  at::ScalarType acc_dtype;
  at::Tensor out;
  at::Tensor partials;
  at::Tensor chunk_products;

  size_t acc_size() const {
    return at::elementSize(acc_dtype);
  }
  bool row_chunks() const {
    return !is_diagonal_gram(gram) && uses_row_chunks(gram.size(0), factor.size(0), acc_size());
  }
  // Rows per chunk or columns per panel.
  int64_t task_span() const {
    return row_chunks() ? kChunkRows : panel_width(factor.size(0), acc_size());
  }
  int64_t task_count() const {
    return ceil_div(gram.size(0), task_span());
  }
};

struct PassTask {
  size_t layer;
  int64_t index;  // within its layer
  int64_t begin;  // first row of a chunk, first column of a panel
  int64_t span;
};

// Thread-local scratch for the tasks, kept between calls: a fresh buffer would be page-faulted in every time.
template <typename acc_t>
std::vector<acc_t>& task_scratch() {
  thread_local std::vector<acc_t> kept;
  return kept;
}

// partial[k][l] = Σ_c product[k][c] f_rows[l][c] over w columns (product: p × w row-major; f_rows: row stride
// ldf): four dot products per pass over a row of the product.
template <typename acc_t>
LORM_EXT_CPU_CLONES void project_partial(const acc_t* __restrict__ product, const acc_t* __restrict__ f_rows,
                                         int64_t ldf, int64_t p, int64_t w, acc_t* __restrict__ partial) {
  for (int64_t k = 0; k < p; ++k) {
    const acc_t* a = product + k * w;
    int64_t l = 0;
    for (; l + 4 <= p; l += 4) {
      const acc_t* f0 = f_rows + l * ldf;
      const acc_t *f1 = f0 + ldf, *f2 = f0 + 2 * ldf, *f3 = f0 + 3 * ldf;
      acc_t d0 = 0, d1 = 0, d2 = 0, d3 = 0;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
      for (int64_t c = 0; c < w; ++c) {
        d0 += a[c] * f0[c];
        d1 += a[c] * f1[c];
        d2 += a[c] * f2[c];
        d3 += a[c] * f3[c];
      }
      partial[k * p + l] = d0;
      partial[k * p + l + 1] = d1;
      partial[k * p + l + 2] = d2;
      partial[k * p + l + 3] = d3;
    }
    for (; l < p; ++l) {
      const acc_t* f0 = f_rows + l * ldf;
      acc_t d0 = 0;
#pragma omp simd reduction(+ : d0)
      for (int64_t c = 0; c < w; ++c) {
        d0 += a[c] * f0[c];
      }
      partial[k * p + l] = d0;
    }
  }
}

// rows (h × w, row-major) = G[i0:i0+h, c0:c0+w] in the acc dtype, and ΣG[i0:i0+h, c0:c0+w] += it where kept.
template <typename input_t, typename acc_t>
LORM_EXT_CPU_CLONES void upcast_rows(const LayerPass& layer, int64_t i0, int64_t h, int64_t c0, int64_t w,
                                     acc_t* __restrict__ rows) {
  const int64_t n = layer.gram.size(0), s0 = layer.gram.stride(0), s1 = layer.gram.stride(1);
  const input_t* g = layer.gram.const_data_ptr<input_t>();
  acc_t* gram_sum = layer.gram_sum.defined() ? layer.gram_sum.mutable_data_ptr<acc_t>() : nullptr;
  for (int64_t j = 0; j < h; ++j) {
    const input_t* __restrict__ src = g + (i0 + j) * s0 + c0 * s1;
    acc_t* __restrict__ row = rows + j * w;
    if (s1 == 1) {
      for (int64_t c = 0; c < w; ++c) {
        row[c] = static_cast<acc_t>(src[c]);
      }
    } else {
      for (int64_t c = 0; c < w; ++c) {
        row[c] = static_cast<acc_t>(src[c * s1]);
      }
    }
    if (gram_sum != nullptr) {
      acc_t* __restrict__ sum_row = gram_sum + (i0 + j) * n + c0;
      for (int64_t c = 0; c < w; ++c) {
        sum_row[c] += row[c];
      }
    }
  }
}

// A row chunk: product (p × n) = F[:, chunk rows] G[chunk rows, :], a contiguous block of rows per GEMM; the
// product stays in chunk_products (added into out later) or becomes the task's B-step partial.
template <typename input_t, typename acc_t>
void chunk_task(const LayerPass& layer, const PassTask& task) {
  const int64_t n = layer.gram.size(0), p = layer.factor.size(0), h = row_block_rows(n, sizeof(acc_t));
  const acc_t* f = layer.factor.const_data_ptr<acc_t>();
  const bool keeps_product = layer.out.defined();
  const int64_t product_size = keeps_product ? 0 : aligned_count<acc_t>(p * n);
  acc_t* scratch = aligned_scratch(task_scratch<acc_t>(), product_size + h * n);
  acc_t* product = keeps_product ? layer.chunk_products.mutable_data_ptr<acc_t>() + task.index * p * n : scratch;
  acc_t* rows = scratch + product_size;
  std::fill(product, product + p * n, acc_t(0));
  for (int64_t i0 = task.begin; i0 < task.begin + task.span; i0 += h) {
    const int64_t hh = std::min(h, task.begin + task.span - i0);
    upcast_rows<input_t, acc_t>(layer, i0, hh, 0, n, rows);
    multiply_add<acc_t>(product, f + i0, n, rows, p, hh, n);
  }
  if (!keeps_product) {
    project_partial<acc_t>(product, f, n, p, n, layer.partials.mutable_data_ptr<acc_t>() + task.index * p * p);
  }
}

// Hands a panel's (F G)[:, c0:c0+w] (acc: p × w, row-major) to where its layer wants it; f_panel is room for
// p × w more values.
template <typename factor_t, typename acc_t>
LORM_EXT_CPU_CLONES void emit_panel(const LayerPass& layer, const PassTask& panel, const acc_t* __restrict__ acc,
                                    acc_t* __restrict__ f_panel) {
  const int64_t n = layer.gram.size(0), p = layer.factor.size(0), c0 = panel.begin, w = panel.span;
  if (layer.out.defined()) {
    acc_t* out = layer.out.mutable_data_ptr<acc_t>();
    for (int64_t k = 0; k < p; ++k) {
      for (int64_t c = 0; c < w; ++c) {
        out[k * n + c0 + c] += acc[k * w + c];
      }
    }
    return;
  }
  const factor_t* f = layer.factor.const_data_ptr<factor_t>();
  for (int64_t l = 0; l < p; ++l) {  // F[:, c0:c0+w], contiguous, in the acc dtype
    for (int64_t c = 0; c < w; ++c) {
      f_panel[l * w + c] = static_cast<acc_t>(f[l * n + c0 + c]);
    }
  }
  project_partial<acc_t>(acc, f_panel, w, p, w, layer.partials.mutable_data_ptr<acc_t>() + panel.index * p * p);
}

template <typename input_t, typename acc_t>
void full_panel(const LayerPass& layer, const PassTask& panel) {
  const int64_t n = layer.gram.size(0), p = layer.factor.size(0), c0 = panel.begin, w = panel.span;
  const int64_t s0 = layer.gram.stride(0), s1 = layer.gram.stride(1);
  const input_t* g = layer.gram.const_data_ptr<input_t>();
  const acc_t* f = layer.factor.const_data_ptr<acc_t>();
  const int64_t acc_size = aligned_count<acc_t>(p * w), rows_size = aligned_count<acc_t>(kBlockRows * w);
  acc_t* acc = aligned_scratch(task_scratch<acc_t>(), acc_size + rows_size + p * w);
  std::fill(acc, acc + p * w, acc_t(0));
  acc_t* rows = acc + acc_size;       // G[i0:i0+h, c0:c0+w] in the acc dtype
  acc_t* f_panel = rows + rows_size;  // for emit_panel
  for (int64_t i0 = 0; i0 < n; i0 += kBlockRows) {
    const int64_t h = std::min(kBlockRows, n - i0);
    upcast_rows<input_t, acc_t>(layer, i0, h, c0, w, rows);
    // The next block's rows (short strided runs) start on their way from memory while this block's GEMM computes.
    for (int64_t j = i0 + h; j < std::min(n, i0 + h + kBlockRows); ++j) {
      const char* next = reinterpret_cast<const char*>(g + j * s0 + c0 * s1);
      for (int64_t byte = 0; byte < w * s1 * static_cast<int64_t>(sizeof(input_t)); byte += 64) {
        __builtin_prefetch(next + byte, 0, 2);
      }
    }
    multiply_add<acc_t>(acc, f + i0, n, rows, p, h, w);
  }
  emit_panel<acc_t, acc_t>(layer, panel, acc, f_panel);
}

template <typename input_t, typename factor_t, typename acc_t>
LORM_EXT_CPU_CLONES void diagonal_panel(const LayerPass& layer, const PassTask& panel) {
  const int64_t n = layer.gram.size(0), p = layer.factor.size(0), s0 = layer.gram.stride(0);
  const int64_t c0 = panel.begin, w = panel.span;
  const input_t* g = layer.gram.const_data_ptr<input_t>();
  const factor_t* f = layer.factor.const_data_ptr<factor_t>();
  std::vector<acc_t>& scratch = task_scratch<acc_t>();
  scratch.resize(w + 2 * p * w);
  acc_t* diag = scratch.data();  // the panel's diagonal, upcast once and contiguous
  acc_t* acc = diag + w;
  acc_t* f_panel = acc + p * w;  // for emit_panel
  for (int64_t c = 0; c < w; ++c) {
    diag[c] = static_cast<acc_t>(g[(c0 + c) * s0]);
  }
  if (layer.gram_sum.defined()) {
    acc_t* gram_sum = layer.gram_sum.mutable_data_ptr<acc_t>() + c0;
    for (int64_t c = 0; c < w; ++c) {
      gram_sum[c] += diag[c];
    }
  }
  for (int64_t k = 0; k < p; ++k) {
    const factor_t* f_row = f + k * n + c0;
    for (int64_t c = 0; c < w; ++c) {
      acc[k * w + c] = static_cast<acc_t>(f_row[c]) * diag[c];
    }
  }
  emit_panel<factor_t, acc_t>(layer, panel, acc, f_panel);
}

template <typename input_t, typename acc_t>
void run_task(const LayerPass& layer, const PassTask& task) {
  if (is_diagonal_gram(layer.gram)) {
    if (layer.factor.scalar_type() == at::kDouble) {
      diagonal_panel<input_t, double, acc_t>(layer, task);
    } else {
      diagonal_panel<input_t, float, acc_t>(layer, task);
    }
  } else if (layer.row_chunks()) {
    chunk_task<input_t, acc_t>(layer, task);
  } else {
    full_panel<input_t, acc_t>(layer, task);
  }
}

// out += F G, or the partials of F G Fᵀ (and ΣG += G where kept) for every layer: one pass over each Gram,
// all layers' tasks in one queue.
void accumulate_passes(std::vector<LayerPass>& layers) {
  std::vector<PassTask> tasks;
  for (size_t l = 0; l < layers.size(); ++l) {
    auto& layer = layers[l];
    const int64_t n = layer.gram.size(0), span = layer.task_span(), count = layer.task_count();
    TORCH_INTERNAL_ASSERT(!layer.partials.defined() || layer.partials.size(0) == std::max<int64_t>(count, 1),
                          "merge pass: one B-step partial per task");
    if (layer.row_chunks() && layer.out.defined()) {
      layer.chunk_products = at::empty({count, layer.factor.size(0), n}, layer.out.options());
    }
    for (int64_t index = 0; index < count; ++index) {
      tasks.push_back({l, index, index * span, std::min(span, n - index * span)});
    }
  }
  // Largest first: a panel's cost is its columns times n, a chunk's its rows times n.
  std::stable_sort(tasks.begin(), tasks.end(), [&](const PassTask& a, const PassTask& b) {
    return a.span * layers[a.layer].gram.size(0) > b.span * layers[b.layer].gram.size(0);
  });
  int64_t work = 0;  // multiply-adds: p per Gram entry read
  for (const auto& layer : layers) {
    work += layer.gram.numel() * layer.factor.size(0);
  }
  pull_tasks(static_cast<int64_t>(tasks.size()), work, [&](int64_t t) {
    const PassTask& task = tasks[t];
    const LayerPass& layer = layers[task.layer];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, layer.gram.scalar_type(), "merge_pass", [&] {
      if (layer.acc_dtype == at::kDouble) {
        run_task<scalar_t, double>(layer, task);
      } else {
        run_task<scalar_t, float>(layer, task);
      }
    });
  });
  for (auto& layer : layers) {
    if (layer.chunk_products.defined()) {
      for (int64_t c = 0; c < layer.chunk_products.size(0); ++c) {
        layer.out.add_(layer.chunk_products[c]);
      }
      layer.chunk_products.reset();
    }
  }
}

void gram_weighted_accumulate_cpu(at::TensorList gram_sums, at::TensorList weighted_sums, at::TensorList grams,
                                  at::TensorList factors, at::TensorList lefts) {
  check_gram_weighted_accumulate_args(gram_sums, weighted_sums, grams, factors, lefts);
  const bool has_lefts = !lefts.empty();
  std::vector<at::Tensor> accumulators(gram_sums.begin(), gram_sums.end());
  accumulators.insert(accumulators.end(), weighted_sums.begin(), weighted_sums.end());
  if (gram_sums.size() > 1 && any_overlap(accumulators)) {
    // Entries share an accumulator: their panels must not run in parallel, so one entry at a time.
    for (size_t i = 0; i < gram_sums.size(); ++i) {
      gram_weighted_accumulate_cpu(gram_sums[i], weighted_sums[i], grams[i], factors[i],
                                   has_lefts ? at::TensorList(lefts[i]) : at::TensorList());
    }
    return;
  }
  std::vector<LayerPass> layers;
  for (size_t i = 0; i < grams.size(); ++i) {
    const at::Tensor& sum = gram_sums[i];
    const at::Tensor factor = pass_factor(factors[i], grams[i], sum);
    // With lefts, F G goes to a scratch first and L (F G) into the weighted sum below.
    const at::Tensor out =
        has_lefts ? at::zeros({factor.size(0), sum.size(0)}, sum.options()) : weighted_sums[i].detach();
    layers.push_back({grams[i].detach(), factor, sum.detach(), sum.scalar_type(), out});
  }
  accumulate_passes(layers);
  if (has_lefts) {
    for (size_t i = 0; i < grams.size(); ++i) {
      weighted_sums[i].detach().addmm_(as_accumulator(lefts[i], gram_sums[i]), layers[i].out);
    }
  }
}

// P_k = Σ of a layer's panel partials (left in partials[0]); ΣP += P_k.
template <typename acc_t>
void reduce_partials(const at::Tensor& partials, const at::Tensor& projection_sum) {
  const int64_t panels = partials.size(0), rr = partials.size(1) * partials.size(2);
  acc_t* p = partials.mutable_data_ptr<acc_t>();
  acc_t* sum = projection_sum.mutable_data_ptr<acc_t>();
  for (int64_t e = 0; e < rr; ++e) {
    acc_t total = 0;
    for (int64_t j = 0; j < panels; ++j) {
      total += p[j * rr + e];
    }
    p[e] = total;
    sum[e] += total;
  }
}

// ΣBP[o0:o1] += B_k[o0:o1] P_k for a rank R known at compile time: each row is R broadcasts and R vector
// multiply-adds against a local copy of P_k, which beats a per-layer at::addmm at small ranks.
template <int64_t R, typename factor_t, typename acc_t>
LORM_EXT_CPU_CLONES void add_projected_rows(acc_t* __restrict__ weighted, const factor_t* __restrict__ b,
                                            const acc_t* __restrict__ p, int64_t o0, int64_t o1) {
  acc_t p_local[R * R];
  std::copy(p, p + R * R, p_local);
  for (int64_t o = o0; o < o1; ++o) {
    acc_t row[R];
    for (int64_t j = 0; j < R; ++j) {
      row[j] = weighted[o * R + j];
    }
    for (int64_t l = 0; l < R; ++l) {
      const acc_t b_ol = static_cast<acc_t>(b[o * R + l]);
      for (int64_t j = 0; j < R; ++j) {
        row[j] += b_ol * p_local[l * R + j];
      }
    }
    for (int64_t j = 0; j < R; ++j) {
      weighted[o * R + j] = row[j];
    }
  }
}

// The ranks with a compiled row kernel; others go through at::addmm (at r = 16 BLAS is the faster of the two).
bool has_row_kernel(int64_t r) {
  return r == 1 || r == 2 || r == 4 || r == 8;
}

template <typename factor_t, typename acc_t>
void add_projected_rows_of_rank(int64_t r, acc_t* weighted, const factor_t* b, const acc_t* p, int64_t o0, int64_t o1) {
  switch (r) {
    case 1: return add_projected_rows<1>(weighted, b, p, o0, o1);
    case 2: return add_projected_rows<2>(weighted, b, p, o0, o1);
    case 4: return add_projected_rows<4>(weighted, b, p, o0, o1);
    case 8: return add_projected_rows<8>(weighted, b, p, o0, o1);
    default: TORCH_INTERNAL_ASSERT(false, "no row kernel for rank ", r, " (has_row_kernel disagrees)");
  }
}

// The B-step after the Gram pass: P_k = Σ partials, ΣP += P_k, ΣBP += B_k P_k. At ranks with a row kernel
// the out × r products of all layers run as row blocks in one parallel loop (one thread when weighted sums
// share memory); other ranks use at::addmm per layer.
void finish_projections(const std::vector<LayerPass>& layers, at::TensorList projection_sums,
                        at::TensorList weighted_sums, const std::vector<at::Tensor>& row_factors_b, bool shared_sums) {
  constexpr int64_t kRowBlock = 256;
  struct RowBlock {
    size_t layer;
    int64_t begin;
    int64_t end;
  };
  std::vector<RowBlock> blocks;
  for (size_t i = 0; i < layers.size(); ++i) {
    AT_DISPATCH_FLOATING_TYPES(layers[i].acc_dtype, "reduce_partials",
                               [&] { reduce_partials<scalar_t>(layers[i].partials, projection_sums[i]); });
    const int64_t r = layers[i].partials.size(1);
    if (!has_row_kernel(r)) {
      weighted_sums[i].detach().addmm_(as_accumulator(row_factors_b[i], projection_sums[i]), layers[i].partials[0]);
      continue;
    }
    const int64_t rows = row_factors_b[i].size(0);
    for (int64_t o = 0; o < rows; o += kRowBlock) {
      blocks.push_back({i, o, std::min(rows, o + kRowBlock)});
    }
  }
  const int64_t count = static_cast<int64_t>(blocks.size());
  at::parallel_for(0, count, shared_sums ? std::max<int64_t>(count, 1) : 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const RowBlock& block = blocks[t];
      const size_t i = block.layer;
      const int64_t r = layers[i].partials.size(1);
      AT_DISPATCH_FLOATING_TYPES(row_factors_b[i].scalar_type(), "add_projected_rows", [&] {
        using factor_t = scalar_t;
        const factor_t* b = row_factors_b[i].const_data_ptr<factor_t>();
        if (layers[i].acc_dtype == at::kDouble) {
          add_projected_rows_of_rank<factor_t, double>(r, weighted_sums[i].mutable_data_ptr<double>(), b,
                                                       layers[i].partials.const_data_ptr<double>(), block.begin,
                                                       block.end);
        } else {
          add_projected_rows_of_rank<factor_t, float>(r, weighted_sums[i].mutable_data_ptr<float>(), b,
                                                      layers[i].partials.const_data_ptr<float>(), block.begin,
                                                      block.end);
        }
      });
    }
  });
}

void projected_accumulate_cpu(at::TensorList projection_sums, at::TensorList weighted_sums, at::TensorList grams,
                              at::TensorList shared_a, at::TensorList factors_b) {
  check_projected_accumulate_args(projection_sums, weighted_sums, grams, shared_a, factors_b);
  // The one pass over each Gram gives P = A G Aᵀ as per-panel partials (A G itself, r × n, is never stored).
  std::vector<LayerPass> layers;
  std::vector<at::Tensor> row_factors_b;  // B_k per layer as the row kernels read it (as_row_factor)
  for (size_t i = 0; i < grams.size(); ++i) {
    LayerPass layer{grams[i].detach(), pass_factor(shared_a[i], grams[i], projection_sums[i]), at::Tensor(),
                    projection_sums[i].scalar_type()};
    const int64_t r = layer.factor.size(0);
    // Every task writes its own partial; an empty Gram has no task and one zero partial (P = 0).
    const auto options = projection_sums[i].options();
    layer.partials =
        layer.gram.size(0) > 0 ? at::empty({layer.task_count(), r, r}, options) : at::zeros({1, r, r}, options);
    layers.push_back(std::move(layer));
    row_factors_b.push_back(as_row_factor(factors_b[i], projection_sums[i]));
  }
  accumulate_passes(layers);
  std::vector<at::Tensor> sums(weighted_sums.begin(), weighted_sums.end());
  finish_projections(layers, projection_sums, weighted_sums, row_factors_b, any_overlap(sums));
}

}  // namespace

TORCH_LIBRARY_IMPL(lorm_ext, CPU, m) {
  m.impl("gram_weighted_accumulate_", &gram_weighted_accumulate_cpu);
  m.impl("projected_accumulate_", &projected_accumulate_cpu);
}

}  // namespace lorm_ext
