// CUDA gram_stats: one read of a Gram for its validation. Each block owns one 32 × 32 tile of the upper
// triangle, stages the mirror tile G[c0:, r0:] through shared memory (coalesced loads, transposed reads),
// and writes its partial statistics; a final ATen reduction combines the blocks.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/amax.h>
#include <ATen/ops/amin.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda/std/limits>

#include "../checks.h"

namespace lorm_ext {
namespace {

constexpr int kTile = 32;
constexpr int kRowsPerPass = 8;  // blockDim = (32, 8): each thread covers 4 rows of the tile
constexpr int kThreads = kTile * kRowsPerPass;

// Partial statistics per block: max |G_ij − G_ji|, min and max diagonal, count of non-finite entries.
struct __align__(8) PartialStats {
  double max_asymmetry, min_diagonal, max_diagonal, nonfinite;
};

template <typename scalar_t>
__global__ void gram_stats_kernel(const scalar_t* __restrict__ gram, int64_t n, PartialStats* __restrict__ out) {
  __shared__ double mirror[kTile][kTile + 1];  // +1: no bank conflicts on the transposed read
  __shared__ double reduce[4][kThreads];
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kTile + tx;
  const int64_t tile_r = blockIdx.y, tile_c = blockIdx.x;
  double asym = 0.0, dmin = ::cuda::std::numeric_limits<double>::infinity(), dmax = -dmin, bad = 0.0;

  if (tile_r <= tile_c) {  // uniform per block, so the barrier below is reached by all its threads
    const int64_t r0 = tile_r * kTile, c0 = tile_c * kTile;
    for (int y = ty; y < kTile; y += kRowsPerPass) {
      const int64_t row = c0 + y, col = r0 + tx;
      mirror[y][tx] = (row < n && col < n) ? static_cast<double>(gram[row * n + col]) : 0.0;
    }
    __syncthreads();
    for (int y = ty; y < kTile; y += kRowsPerPass) {
      const int64_t r = r0 + y, c = c0 + tx;
      // Within a diagonal tile each unordered pair is visited once (c >= r).
      if (r >= n || c >= n || (tile_r == tile_c && c < r)) {
        continue;
      }
      const double a = static_cast<double>(gram[r * n + c]);
      const double b = mirror[tx][y];  // G[c, r]
      const bool a_ok = isfinite(a), b_ok = isfinite(b);
      if (!a_ok || !b_ok) {
        bad += (!a_ok) + (r != c && !b_ok);
        continue;
      }
      asym = fmax(asym, fabs(a - b));
      if (r == c) {
        dmin = fmin(dmin, a);
        dmax = fmax(dmax, a);
      }
    }
  }

  reduce[0][tid] = asym;
  reduce[1][tid] = dmin;
  reduce[2][tid] = dmax;
  reduce[3][tid] = bad;
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
    out[blockIdx.y * gridDim.x + blockIdx.x] = {reduce[0][0], reduce[1][0], reduce[2][0], reduce[3][0]};
  }
}

at::Tensor full_stats(const at::Tensor& gram) {
  const int64_t n = gram.size(0);
  const int64_t tiles = (n + kTile - 1) / kTile;
  at::Tensor partial = at::empty({tiles * tiles, 4}, gram.options().dtype(at::kDouble));
  if (tiles > 0) {
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(tiles));
    const dim3 block(kTile, kRowsPerPass);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gram.scalar_type(), "gram_stats_cuda", [&] {
      gram_stats_kernel<scalar_t><<<grid, block, 0, stream>>>(
          gram.const_data_ptr<scalar_t>(), n, reinterpret_cast<PartialStats*>(partial.mutable_data_ptr<double>()));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return at::stack(
      {at::amax(partial.select(1, 0), 0), at::amin(partial.select(1, 1), 0), at::amax(partial.select(1, 2), 0),
       at::sum(partial.select(1, 3), 0)});
}

at::Tensor diagonal_stats(const at::Tensor& gram) {
  const at::Tensor values = gram.to(at::kDouble);
  const at::Tensor finite = at::isfinite(values);
  const double inf = ::cuda::std::numeric_limits<double>::infinity();
  return at::stack(
      {at::zeros({}, values.options()), at::amin(at::where(finite, values, inf), 0),
       at::amax(at::where(finite, values, -inf), 0), at::sum(finite.logical_not(), 0).to(at::kDouble)});
}

at::Tensor gram_stats_cuda(const at::Tensor& gram_in) {
  check_gram_stats_args(gram_in);
  const c10::cuda::CUDAGuard guard(gram_in.device());
  const at::Tensor gram = gram_in.detach().contiguous();
  return is_diagonal_gram(gram) ? diagonal_stats(gram) : full_stats(gram);
}

}  // namespace

TORCH_LIBRARY_IMPL(lorm_ext, CUDA, m) {
  m.impl("gram_stats", &gram_stats_cuda);
}

}  // namespace lorm_ext
