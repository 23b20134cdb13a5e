// CPU gram_stats: one read of a Gram gives everything its validation needs (symmetry, finiteness, diagonal
// range), instead of several passes and an n × n temporary for G − Gᵀ. Tile pairs (i <= j) of the upper
// triangle are split over threads; each task reads tile (i, j) and its mirror (j, i) while both are in cache.
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

// 128 × 128 tiles: the transposed copy of the mirror tile (at most 128 KiB) stays in L2.
constexpr int64_t kStatsTile = 128;

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

// The fast pass: max |a − b| over the pair in the input's precision (float for 16- and 32-bit inputs,
// enough to compare against a sqrt(eps) tolerance), with a finiteness probe (x − x is 0 for finite x,
// NaN otherwise) in the same vectorised loop. The mirror tile is first copied transposed, reading rows.
template <typename scalar_t>
Stats tile_pair_stats(const scalar_t* g, int64_t n, int64_t i0, int64_t ti, int64_t j0, int64_t tj, void* scratch) {
  using value_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  value_t* mirror = static_cast<value_t*>(scratch);  // mirror[r][c] = G[j0 + c, i0 + r]
  for (int64_t c = 0; c < tj; ++c) {
    const scalar_t* row = g + (j0 + c) * n + i0;
    for (int64_t r = 0; r < ti; ++r) {
      mirror[r * tj + c] = static_cast<value_t>(row[r]);
    }
  }
  value_t asymmetry = 0, probe = 0;
  for (int64_t r = 0; r < ti; ++r) {
    const scalar_t* row = g + (i0 + r) * n + j0;
    const value_t* mirrored = mirror + r * tj;
#pragma omp simd reduction(max : asymmetry) reduction(+ : probe)
    for (int64_t c = 0; c < tj; ++c) {
      const value_t a = static_cast<value_t>(row[c]), b = mirrored[c];
      asymmetry = std::max(asymmetry, std::abs(a - b));
      probe += (a - a) + (b - b);
    }
  }
  if (!std::isfinite(static_cast<double>(probe))) {
    return tile_pair_stats_exact(g, n, i0, ti, j0, tj);
  }
  Stats s;
  s.max_asymmetry = static_cast<double>(asymmetry);
  if (i0 == j0) {
    for (int64_t d = 0; d < ti; ++d) {
      s.diagonal_entry(static_cast<double>(g[(i0 + d) * n + i0 + d]));
    }
  }
  return s;
}

template <typename scalar_t>
Stats full_stats(const at::Tensor& gram) {
  const int64_t n = gram.size(0);
  const scalar_t* g = gram.const_data_ptr<scalar_t>();
  const auto pairs = upper_triangle_tiles(n, kStatsTile);
  std::vector<Stats> per_pair(pairs.size());
  at::parallel_for(0, static_cast<int64_t>(pairs.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<double> scratch(kStatsTile * kStatsTile);  // room for a float64 mirror tile
    for (int64_t p = begin; p < end; ++p) {
      const int64_t i0 = pairs[p].first * kStatsTile, j0 = pairs[p].second * kStatsTile;
      per_pair[p] = tile_pair_stats(
          g, n, i0, std::min(kStatsTile, n - i0), j0, std::min(kStatsTile, n - j0), scratch.data());
    }
  });
  Stats total;
  for (const auto& s : per_pair) {
    total.merge(s);
  }
  return total;
}

template <typename scalar_t>
Stats diagonal_stats(const at::Tensor& gram) {
  Stats s;
  const scalar_t* g = gram.const_data_ptr<scalar_t>();
  for (int64_t i = 0; i < gram.size(0); ++i) {
    const double v = static_cast<double>(g[i]);
    if (std::isfinite(v)) {
      s.diagonal_entry(v);
    } else {
      s.nonfinite += 1;
    }
  }
  return s;
}

at::Tensor gram_stats_cpu(const at::Tensor& gram_in) {
  check_gram_stats_args(gram_in);
  const at::Tensor gram = gram_in.detach().contiguous();
  Stats s;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gram.scalar_type(), "gram_stats", [&] {
    s = is_diagonal_gram(gram) ? diagonal_stats<scalar_t>(gram) : full_stats<scalar_t>(gram);
  });
  return at::tensor({s.max_asymmetry, s.min_diagonal, s.max_diagonal, s.nonfinite}, at::kDouble);
}

}  // namespace

TORCH_LIBRARY_IMPL(lorm_ext, CPU, m) {
  m.impl("gram_stats", &gram_stats_cpu);
}

}  // namespace lorm_ext
