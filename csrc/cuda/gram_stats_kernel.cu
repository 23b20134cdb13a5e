// CUDA gram_stats kernel: one read of a Gram for its validation (host side: ops_cuda.cu). Each block owns one
// 32 × 32 tile of the upper triangle, stages the mirror tile G[c0:, r0:] through shared memory (coalesced
// loads, transposed reads) and writes its partial statistics; the host combines the blocks.
#include <cuda/std/limits>

#include "device_utils.cuh"

namespace lorm_ext::cuda {
namespace {

constexpr int kRowsPerPass = kThreads / kStatsTile;  // blockDim = (32, 8): each thread covers 4 tile rows

template <typename input_t>
__global__ void __launch_bounds__(kThreads) gram_stats_kernel(
    const input_t* __restrict__ gram, int64_t n, StatsPartial* __restrict__ partials) {
  __shared__ double mirror[kStatsTile][kStatsTile + 1];  // +1: no bank conflicts on the transposed read
  __shared__ double reduce[4][kThreads];
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kStatsTile + tx;
  const int64_t tile_r = blockIdx.y, tile_c = blockIdx.x;
  double asymmetry = 0.0, nonfinite = 0.0;
  double min_diagonal = ::cuda::std::numeric_limits<double>::infinity(), max_diagonal = -min_diagonal;

  if (tile_r <= tile_c) {  // uniform per block, so every thread of it reaches the barrier below
    const int64_t r0 = tile_r * kStatsTile, c0 = tile_c * kStatsTile;
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
      const bool a_finite = isfinite(a), b_finite = isfinite(b);
      if (!a_finite || !b_finite) {
        nonfinite += (!a_finite) + (r != c && !b_finite);
        continue;
      }
      asymmetry = fmax(asymmetry, fabs(a - b));
      if (r == c) {
        min_diagonal = fmin(min_diagonal, a);
        max_diagonal = fmax(max_diagonal, a);
      }
    }
  }

  reduce[0][tid] = asymmetry;
  reduce[1][tid] = min_diagonal;
  reduce[2][tid] = max_diagonal;
  reduce[3][tid] = nonfinite;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (tid < stride) {
      reduce[0][tid] = fmax(reduce[0][tid], reduce[0][tid + stride]);
      reduce[1][tid] = fmin(reduce[1][tid], reduce[1][tid + stride]);
      reduce[2][tid] = fmax(reduce[2][tid], reduce[2][tid + stride]);
      reduce[3][tid] += reduce[3][tid + stride];
    }
    __syncthreads();
  }
  if (tid == 0) {
    partials[blockIdx.y * gridDim.x + blockIdx.x] = {reduce[0][0], reduce[1][0], reduce[2][0], reduce[3][0]};
  }
}

}  // namespace

template <typename input_t>
cudaError_t StatsLaunch<input_t>::launch(const input_t* gram, int64_t n, StatsPartial* partials, cudaStream_t stream) {
  const auto tiles = static_cast<unsigned>(ceil_div(n, kStatsTile));
  gram_stats_kernel<input_t><<<dim3(tiles, tiles), dim3(kStatsTile, kRowsPerPass), 0, stream>>>(gram, n, partials);
  return cudaGetLastError();
}

template struct StatsLaunch<Half16>;
template struct StatsLaunch<BFloat16>;
template struct StatsLaunch<float>;
template struct StatsLaunch<double>;

}  // namespace lorm_ext::cuda
