// CPU gram_stats: one read of each Gram gives everything its validation needs (symmetry, finiteness, diagonal
// range), instead of several passes and an n × n temporary for G − Gᵀ. Tile pairs (i <= j) of the upper
// triangle are split over threads; each task reads tile (i, j) and its mirror (j, i).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "tiling.h"

namespace lorm_ext {
namespace {

// Tile pairs of 256 × 256 per parallel task: rows of 1 KiB (fp32) for the memory system; the W-row strips of
// the mirror tile that a sweep revisits stay in L1.
constexpr int64_t kStatsTaskTile = 256;

// How far ahead (in elements along a mirror row) tile_pair_stats prefetches: four cache lines of float32.
constexpr int64_t kMirrorPrefetch = 64;

// The fast passes compare in float for 16- and 32-bit inputs (enough against a sqrt(eps) tolerance).
template <typename scalar_t>
using fast_value_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

struct Stats {
  double max_asymmetry = 0.0;
  double min_diagonal = std::numeric_limits<double>::infinity();
  double max_diagonal = -std::numeric_limits<double>::infinity();
  double nonfinite = 0.0;

  void merge(const Stats& o) {
    max_asymmetry = std::max(max_asymmetry, o.max_asymmetry);
    min_diagonal = std::min(min_diagonal, o.min_diagonal);
    max_diagonal = std::max(max_diagonal, o.max_diagonal);
    nonfinite += o.nonfinite;
  }

  void diagonal_entry(double v) {
    min_diagonal = std::min(min_diagonal, v);
    max_diagonal = std::max(max_diagonal, v);
  }
};

// Exact statistics of one tile pair, non-finite entries counted and left out: the slow path, taken only
// for a tile pair the fast pass found non-finite values in.
template <typename scalar_t>
Stats tile_pair_stats_exact(const scalar_t* g, int64_t n, int64_t i0, int64_t ti, int64_t j0, int64_t tj) {
  Stats s;
  for (int64_t r = i0; r < i0 + ti; ++r) {
    for (int64_t c = (i0 == j0 ? r : j0); c < j0 + tj; ++c) {  // diagonal tile: each pair once
      const double a = static_cast<double>(g[r * n + c]);
      const double b = static_cast<double>(g[c * n + r]);
      if (!std::isfinite(a) || !std::isfinite(b)) {
        s.nonfinite += (!std::isfinite(a)) + (r != c && !std::isfinite(b));
        continue;
      }
      s.max_asymmetry = std::max(s.max_asymmetry, std::abs(a - b));
      if (r == c) {
        s.diagonal_entry(a);
      }
    }
  }
  return s;
}

// The fast pass works on W × W blocks held in 32-byte vectors (W = 8 floats or 4 doubles; GCC's vector extensions,
// compiled for each instruction set of LORM_EXT_CPU_CLONES): the mirror block is transposed in registers, so both
// sides of every comparison are contiguous vector loads and nothing is reduced horizontally until the tile ends.
typedef float float_vec __attribute__((vector_size(32)));
typedef double double_vec __attribute__((vector_size(32)));
typedef int32_t float_mask __attribute__((vector_size(32)));
typedef int64_t double_mask __attribute__((vector_size(32)));

template <typename value_t>
struct Block;
template <>
struct Block<float> {
  using vec = float_vec;
  using mask = float_mask;
  static constexpr int kWidth = 8;
};
template <>
struct Block<double> {
  using vec = double_vec;
  using mask = double_mask;
  static constexpr int kWidth = 4;
};

// W elements from src into a vector (an out-parameter: returning a 32-byte vector from a function compiled for
// baseline x86-64 would be an ABI question; this inlines into the cloned callers either way).
template <typename value_t, typename scalar_t>
inline void load_block_row(typename Block<value_t>::vec& v, const scalar_t* src) {
  if constexpr (std::is_same_v<value_t, scalar_t>) {
    std::memcpy(&v, src, sizeof(v));
  } else {
    for (int k = 0; k < Block<value_t>::kWidth; ++k) {
      v[k] = static_cast<value_t>(src[k]);
    }
  }
}

// Rows i and i + b exchange their (b-wide) off-diagonal blocks; stages b = W/2, …, 1 transpose the W × W block.
template <typename vec, typename mask>
inline void swap_stage(vec* rows, int b, const mask& low, const mask& high) {
  for (int i = 0; i < static_cast<int>(sizeof(vec) / sizeof(rows[0][0])); ++i) {
    if ((i & b) == 0) {
      const vec x = rows[i], y = rows[i + b];
      rows[i] = __builtin_shuffle(x, y, low);
      rows[i + b] = __builtin_shuffle(x, y, high);
    }
  }
}

inline void transpose_block(Block<float>::vec* rows) {
  using mask = Block<float>::mask;
  swap_stage(rows, 4, mask{0, 1, 2, 3, 8, 9, 10, 11}, mask{4, 5, 6, 7, 12, 13, 14, 15});
  swap_stage(rows, 2, mask{0, 1, 8, 9, 4, 5, 12, 13}, mask{2, 3, 10, 11, 6, 7, 14, 15});
  swap_stage(rows, 1, mask{0, 8, 2, 10, 4, 12, 6, 14}, mask{1, 9, 3, 11, 5, 13, 7, 15});
}

inline void transpose_block(Block<double>::vec* rows) {
  using mask = Block<double>::mask;
  swap_stage(rows, 2, mask{0, 1, 4, 5}, mask{2, 3, 6, 7});
  swap_stage(rows, 1, mask{0, 4, 2, 6}, mask{1, 5, 3, 7});
}

// The fast pass over a tile pair whose sides are multiples of W: max |a − b| in fast_value_t and a finiteness
// probe (x − x is 0 for finite x, NaN otherwise), without branches. A diagonal tile compares the pairs of its
// diagonal blocks twice (harmless for a maximum; the probe is only a flag, the exact pass counts).
template <typename scalar_t>
LORM_EXT_CPU_CLONES Stats tile_pair_stats(const scalar_t* g, int64_t n, int64_t i0, int64_t ti, int64_t j0,
                                          int64_t tj) {
  using value_t = fast_value_t<scalar_t>;
  using vec = typename Block<value_t>::vec;
  constexpr int W = Block<value_t>::kWidth;
  const bool diagonal_tile = i0 == j0;
  vec asymmetry{}, probe{};
  for (int64_t r = 0; r < ti; r += W) {
    for (int64_t c = diagonal_tile ? r : 0; c < tj; c += W) {
      vec mirror[W];
      for (int k = 0; k < W; ++k) {
        const scalar_t* mirror_row = g + (j0 + c + k) * n + i0 + r;
        // The mirror rows are short strided runs that the hardware prefetchers do not follow: start the
        // cache line of a later strip now, so that its miss overlaps this strip's work.
        __builtin_prefetch(mirror_row + kMirrorPrefetch, 0, 3);
        load_block_row<value_t>(mirror[k], mirror_row);
      }
      transpose_block(mirror);
      for (int k = 0; k < W; ++k) {
        vec a;
        const scalar_t* direct_row = g + (i0 + r + k) * n + j0 + c;
        __builtin_prefetch(direct_row + W * n, 0, 3);  // the same columns of the next strip's rows
        load_block_row<value_t>(a, direct_row);
        const vec d = a - mirror[k];
        const vec magnitude = d < 0 ? -d : d;
        asymmetry = magnitude > asymmetry ? magnitude : asymmetry;
        probe += (a - a) + (mirror[k] - mirror[k]);
      }
    }
  }
  value_t max_asymmetry = 0, finite_probe = 0;
  for (int k = 0; k < W; ++k) {
    max_asymmetry = std::max(max_asymmetry, asymmetry[k]);
    finite_probe += probe[k];
  }
  if (!std::isfinite(static_cast<double>(finite_probe))) {
    return tile_pair_stats_exact(g, n, i0, ti, j0, tj);
  }
  Stats s;
  s.max_asymmetry = static_cast<double>(max_asymmetry);
  if (diagonal_tile) {
    for (int64_t d = 0; d < ti; ++d) {
      s.diagonal_entry(static_cast<double>(g[(i0 + d) * n + i0 + d]));
    }
  }
  return s;
}

// A diagonal Gram: the same branch-free fast pass (min, max and the finiteness probe, vectorized), and an
// exact pass only when the probe finds a non-finite entry.
template <typename scalar_t>
LORM_EXT_CPU_CLONES Stats diagonal_stats(const scalar_t* g, int64_t n) {
  using value_t = fast_value_t<scalar_t>;
  value_t low = std::numeric_limits<value_t>::infinity(), high = -low, probe = 0;
#pragma omp simd reduction(min : low) reduction(max : high) reduction(+ : probe)
  for (int64_t i = 0; i < n; ++i) {
    const value_t v = static_cast<value_t>(g[i]);
    low = std::min(low, v);
    high = std::max(high, v);
    probe += v - v;
  }
  Stats s;
  if (std::isfinite(static_cast<double>(probe))) {
    s.min_diagonal = static_cast<double>(low);
    s.max_diagonal = static_cast<double>(high);
    return s;
  }
  for (int64_t i = 0; i < n; ++i) {
    const double v = static_cast<double>(g[i]);
    if (std::isfinite(v)) {
      s.diagonal_entry(v);
    } else {
      s.nonfinite += 1;
    }
  }
  return s;
}

// One task: a whole diagonal Gram, a tile pair of a full Gram's vector region (the leading rows and columns, a
// multiple of the block width W), or the exact pass over the pairs that involve the last n mod W columns.
struct StatsTask {
  enum Kind { kDiagonalGram, kTilePair, kBorder } kind;
  size_t layer;
  int64_t i0 = 0;
  int64_t j0 = 0;
};

at::Tensor gram_stats_cpu(at::TensorList grams_in) {
  check_gram_stats_args(grams_in);
  std::vector<at::Tensor> grams;
  std::vector<int64_t> vector_region;  // per layer: the leading rows/columns the fast pass covers
  std::vector<StatsTask> tasks;
  for (size_t l = 0; l < grams_in.size(); ++l) {
    grams.push_back(grams_in[l].detach().contiguous());
    const at::Tensor& gram = grams[l];
    if (is_diagonal_gram(gram)) {
      vector_region.push_back(0);
      tasks.push_back({StatsTask::kDiagonalGram, l});
      continue;
    }
    int64_t width = 0;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gram.scalar_type(), "gram_stats_width",
                                    [&] { width = Block<fast_value_t<scalar_t>>::kWidth; });
    const int64_t n = gram.size(0), covered = n / width * width;
    vector_region.push_back(covered);
    for (const auto& [ti, tj] : upper_triangle_tiles(covered, kStatsTaskTile)) {
      tasks.push_back({StatsTask::kTilePair, l, ti * kStatsTaskTile, tj * kStatsTaskTile});
    }
    if (covered < n) {
      tasks.push_back({StatsTask::kBorder, l});
    }
  }
  std::vector<Stats> per_task(tasks.size());
  int64_t values = 0;
  for (const auto& gram : grams) {
    values += gram.numel();
  }
  // All layers' tasks in one parallel loop: many small Grams cost one dispatch, not one each.
  pull_tasks(static_cast<int64_t>(tasks.size()), values, [&](int64_t t) {
    const StatsTask& task = tasks[t];
    const at::Tensor& gram = grams[task.layer];
    const int64_t n = gram.size(0), covered = vector_region[task.layer];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gram.scalar_type(), "gram_stats", [&] {
      const scalar_t* g = gram.const_data_ptr<scalar_t>();
      switch (task.kind) {
        case StatsTask::kDiagonalGram: per_task[t] = diagonal_stats(g, n); return;
        case StatsTask::kTilePair:
          per_task[t] = tile_pair_stats(g, n, task.i0, std::min(kStatsTaskTile, covered - task.i0), task.j0,
                                        std::min(kStatsTaskTile, covered - task.j0));
          return;
        case StatsTask::kBorder:  // columns [covered, n) against every row: a rectangle and a corner
          per_task[t] = tile_pair_stats_exact(g, n, 0, covered, covered, n - covered);
          per_task[t].merge(tile_pair_stats_exact(g, n, covered, n - covered, covered, n - covered));
          return;
      }
      TORCH_INTERNAL_ASSERT(false, "unknown gram_stats task");
    });
  });
  std::vector<Stats> per_layer(grams.size());
  for (size_t t = 0; t < tasks.size(); ++t) {
    per_layer[tasks[t].layer].merge(per_task[t]);
  }
  at::Tensor out = at::empty({static_cast<int64_t>(grams.size()), 4}, at::kDouble);
  double* o = out.mutable_data_ptr<double>();
  for (size_t l = 0; l < per_layer.size(); ++l) {
    const Stats& s = per_layer[l];
    o[4 * l] = s.max_asymmetry;
    o[4 * l + 1] = s.min_diagonal;
    o[4 * l + 2] = s.max_diagonal;
    o[4 * l + 3] = s.nonfinite;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lorm_ext, CPU, m) {
  m.impl("gram_stats", &gram_stats_cpu);
}

}  // namespace lorm_ext
