// CPU gram_stats: one read of each Gram gives everything its validation needs (symmetry, finiteness, diagonal
// range), instead of several passes and an n × n temporary for G − Gᵀ. Tile pairs (i <= j) of the upper
// triangle are split over threads; each task reads tile (i, j) and its mirror (j, i).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "tiling.h"

namespace lorm_ext {
namespace {

// Tile pairs of 128 × 128: enough of them to balance the threads, few enough to keep the task list short.
constexpr int64_t kStatsTile = 128;

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

// The fast pass: max |a − b| over the pair in fast_value_t and a finiteness probe (x − x is 0 for finite x,
// NaN otherwise), without branches. The mirror element G[c, r] is read in 16 × 16 blocks: the 16 rows of G it
// touches stay in L1 while the block is swept, so no transposed copy is needed.
template <typename scalar_t>
LORM_EXT_CPU_CLONES Stats tile_pair_stats(const scalar_t* g, int64_t n, int64_t i0, int64_t ti, int64_t j0, int64_t tj) {
  using value_t = fast_value_t<scalar_t>;
  constexpr int64_t kBlock = 16;
  const bool diagonal_tile = i0 == j0;
  value_t asymmetry = 0, probe = 0;
  for (int64_t rb = 0; rb < ti; rb += kBlock) {
    for (int64_t cb = diagonal_tile ? rb : 0; cb < tj; cb += kBlock) {
      for (int64_t r = rb; r < std::min(rb + kBlock, ti); ++r) {
        const scalar_t* row = g + (i0 + r) * n + j0;
        const scalar_t* mirror = g + j0 * n + i0 + r;  // mirror[c * n] = G[j0 + c, i0 + r]
        const int64_t first = diagonal_tile ? std::max(cb, r) : cb;  // diagonal tile: each pair once
        for (int64_t c = first; c < std::min(cb + kBlock, tj); ++c) {
          const value_t a = static_cast<value_t>(row[c]), b = static_cast<value_t>(mirror[c * n]);
          asymmetry = std::max(asymmetry, std::abs(a - b));
          probe += (a - a) + (b - b);
        }
      }
    }
  }
  if (!std::isfinite(static_cast<double>(probe))) {
    return tile_pair_stats_exact(g, n, i0, ti, j0, tj);
  }
  Stats s;
  s.max_asymmetry = static_cast<double>(asymmetry);
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

// One task: a tile pair of a full Gram, or a whole diagonal Gram (tile indices unused).
struct StatsTask {
  size_t layer;
  int64_t tile_i;
  int64_t tile_j;
};

at::Tensor gram_stats_cpu(at::TensorList grams_in) {
  check_gram_stats_args(grams_in);
  std::vector<at::Tensor> grams;
  std::vector<StatsTask> tasks;
  for (size_t l = 0; l < grams_in.size(); ++l) {
    grams.push_back(grams_in[l].detach().contiguous());
    if (is_diagonal_gram(grams[l])) {
      tasks.push_back({l, 0, 0});
      continue;
    }
    for (const auto& [ti, tj] : upper_triangle_tiles(grams[l].size(0), kStatsTile)) {
      tasks.push_back({l, ti, tj});
    }
  }
  std::vector<Stats> per_task(tasks.size());
  // All layers' tasks in one parallel loop: many small Grams cost one dispatch, not one each.
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const at::Tensor& gram = grams[tasks[t].layer];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gram.scalar_type(), "gram_stats", [&] {
        if (is_diagonal_gram(gram)) {
          per_task[t] = diagonal_stats(gram.const_data_ptr<scalar_t>(), gram.size(0));
          return;
        }
        const int64_t n = gram.size(0);
        const int64_t i0 = tasks[t].tile_i * kStatsTile, j0 = tasks[t].tile_j * kStatsTile;
        per_task[t] = tile_pair_stats(
            gram.const_data_ptr<scalar_t>(), n, i0, std::min(kStatsTile, n - i0), j0, std::min(kStatsTile, n - j0));
      });
    }
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
