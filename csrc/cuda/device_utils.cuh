// Device helpers shared by the kernels: on-the-fly upcasts, the block -> item lookup of grouped launches
// (see kernels.cuh) and the numbering of upper-triangle tiles.
#pragma once

#include <cuda_fp16.h>

#include "kernels.cuh"

namespace lorm_ext::cuda {

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) {
  return a < b ? a : b;
}

// Input element -> accumulator type, as the reference's `.to(acc dtype)`: exact for 16-bit -> float and
// float -> double, rounding for double -> float.
template <typename acc_t>
__device__ __forceinline__ acc_t upcast(Half16 v) {
  return static_cast<acc_t>(__half2float(__ushort_as_half(v.bits)));
}
template <typename acc_t>
__device__ __forceinline__ acc_t upcast(BFloat16 v) {
  return static_cast<acc_t>(__uint_as_float(static_cast<uint32_t>(v.bits) << 16));
}
template <typename acc_t>
__device__ __forceinline__ acc_t upcast(float v) {
  return static_cast<acc_t>(v);
}
template <typename acc_t>
__device__ __forceinline__ acc_t upcast(double v) {
  return static_cast<acc_t>(v);
}

// Upper-triangle tile number `index` of a side of `tiles` tiles: row ti holds tiles (ti, ti..tiles-1).
__device__ __forceinline__ void triangle_tile(int tiles, int index, int& ti, int& tj) {
  ti = 0;
  while (index >= tiles - ti) {
    index -= tiles - ti;
    ++ti;
  }
  tj = ti + index;
}

// Index of the item this block works for: the last one whose first_block <= blockIdx.x. Items are sorted
// by first_block and the first starts at 0.
template <typename Params>
__device__ __forceinline__ int find_item(const Params& params) {
  const int64_t block = blockIdx.x;
  const auto& items = params.items;
  int lo = 0, hi = params.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (items[mid].first_block <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

}  // namespace lorm_ext::cuda
