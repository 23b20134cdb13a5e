// CUDA gram_stats kernels: one read of many Grams for their validation (host side: ops_cuda.cu). One
// launch covers all the Grams of a dtype (see kernels.cuh): a block of a full Gram owns one 32 × 32 tile of
// its upper triangle and stages the mirror tile G[c0:, r0:] through shared memory (coalesced loads,
// transposed reads); a block of a diagonal Gram owns kStatsChunk entries. Each block writes its partial
// statistics, and a second launch, one block per Gram, combines them in a fixed order into the Gram's row.
#include <cuda/std/limits>

#include "device_utils.cuh"

namespace lorm_ext::cuda {
namespace {

constexpr int kRowsPerPass = kThreads / kStatsTile;  // a full-Gram block's threads as (32, 8): 4 tile rows each

struct Stats {
  double asymmetry = 0.0;
  double min_diagonal = ::cuda::std::numeric_limits<double>::infinity();
  double max_diagonal = -::cuda::std::numeric_limits<double>::infinity();
  double nonfinite = 0.0;

  __device__ void add_diagonal(double v) {
    if (!isfinite(v)) {
      nonfinite += 1;
      return;
    }
    min_diagonal = fmin(min_diagonal, v);
    max_diagonal = fmax(max_diagonal, v);
  }

  __device__ void add(const StatsPartial& p) {
    asymmetry = fmax(asymmetry, p.max_asymmetry);
    min_diagonal = fmin(min_diagonal, p.min_diagonal);
    max_diagonal = fmax(max_diagonal, p.max_diagonal);
    nonfinite += p.nonfinite;
  }
};

// The block's statistics: every thread's combined by a tree over shared memory, a fixed order. Returns
// the total in thread 0.
__device__ StatsPartial block_combine(const Stats& mine) {
  __shared__ StatsPartial reduce[kThreads];
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  reduce[tid] = {mine.asymmetry, mine.min_diagonal, mine.max_diagonal, mine.nonfinite};
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (tid < stride) {
      Stats s;
      s.add(reduce[tid]);
      s.add(reduce[tid + stride]);
      reduce[tid] = {s.asymmetry, s.min_diagonal, s.max_diagonal, s.nonfinite};
    }
    __syncthreads();
  }
  return reduce[0];
}

template <typename input_t>
__global__ void __launch_bounds__(kThreads) gram_stats_kernel(StatsParams params) {
  __shared__ double mirror[kStatsTile][kStatsTile + 1];  // +1: no bank conflicts on the transposed read
  const StatsItem item = params.items[find_item(params)];
  const int64_t local = blockIdx.x - item.first_block;
  const auto* gram = static_cast<const input_t*>(item.gram);
  const int64_t n = item.n;
  const int tx = threadIdx.x, ty = threadIdx.y;
  Stats stats;

  if (item.diagonal) {  // uniform per block, so every thread of it reaches the barriers
    for (int u = 0; u < kStatsChunk / kThreads; ++u) {
      const int64_t e = local * kStatsChunk + u * kThreads + ty * kStatsTile + tx;
      if (e < n) {
        stats.add_diagonal(upcast<double>(gram[e]));
      }
    }
  } else {
    int tile_r, tile_c;
    triangle_tile(item.tiles, static_cast<int>(local), tile_r, tile_c);
    const int64_t r0 = int64_t{tile_r} * kStatsTile, c0 = int64_t{tile_c} * kStatsTile;
    for (int y = ty; y < kStatsTile; y += kRowsPerPass) {
      const int64_t row = c0 + y, col = r0 + tx;
      mirror[y][tx] = (row < n && col < n) ? upcast<double>(gram[row * n + col]) : 0.0;
    }
    __syncthreads();
    for (int y = ty; y < kStatsTile; y += kRowsPerPass) {
      const int64_t r = r0 + y, c = c0 + tx;
      // Within a diagonal tile each unordered pair is visited once (c >= r).
      if (r >= n || c >= n || (tile_r == tile_c && c < r)) {
        continue;
      }
      const double a = upcast<double>(gram[r * n + c]);
      const double b = mirror[tx][y];  // G[c, r]
      if (r == c) {
        stats.add_diagonal(a);
        continue;
      }
      const bool a_finite = isfinite(a), b_finite = isfinite(b);
      if (!a_finite || !b_finite) {
        stats.nonfinite += (!a_finite) + (!b_finite);
        continue;
      }
      stats.asymmetry = fmax(stats.asymmetry, fabs(a - b));
    }
  }

  const StatsPartial total = block_combine(stats);
  if (tx == 0 && ty == 0) {
    item.partials[local] = total;
  }
}

// Block i combines Gram i's partials: each thread a strided subset in order, then the block's tree.
__global__ void __launch_bounds__(kThreads) gram_stats_finish_kernel(StatsParams params) {
  const StatsItem item = params.items[blockIdx.x];
  Stats stats;
  for (int64_t b = threadIdx.x + threadIdx.y * blockDim.x; b < item.blocks; b += kThreads) {
    stats.add(item.partials[b]);
  }
  const StatsPartial total = block_combine(stats);
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    *item.out = total;
  }
}

}  // namespace

template <typename input_t>
cudaError_t StatsLaunch<input_t>::launch(const StatsParams& params, int64_t blocks, cudaStream_t stream) {
  const dim3 threads(kStatsTile, kRowsPerPass);
  gram_stats_kernel<input_t><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(params);
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) {
    return status;
  }
  gram_stats_finish_kernel<<<static_cast<unsigned>(params.count), threads, 0, stream>>>(params);
  return cudaGetLastError();
}

template struct StatsLaunch<Half16>;
template struct StatsLaunch<BFloat16>;
template struct StatsLaunch<float>;
template struct StatsLaunch<double>;

}  // namespace lorm_ext::cuda
