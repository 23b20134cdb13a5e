// CUDA streaming merge kernels, batched across layers (host side: ops_cuda.cu).
//
// The pass over the client Grams is one launch of the panel kernel: a block owns 64 columns of one layer's
// Gram and walks down all its rows, reading each element once, upcasting it on the fly and using it for
// every sum that needs it while it is in registers:
//   gram_weighted_accumulate_   gram_sums += G and (F G) for 16 rows of F at a time (those rows' partial
//                               sums stay in registers, so one pass serves a rank <= 16; every further 16
//                               rows take one more pass), added into weighted_sums or, with lefts, staged;
//   projected_accumulate_       (A G) for the block's columns, then its share of A G Aᵀ (r × r) as one
//                               partial per panel.
// Small follow-up launches finish what is r × r or m × r: the fixed-order sum of the per-panel partials (P,
// added to projection_sums) and the products weighted_sums += L (F G) or += B P. Diagonal Grams take the
// same launches with an elementwise body instead of the walk down the rows.
//
// Every sum over rows, row groups or panels runs in a fixed order, and no two blocks of a launch add to the
// same accumulator element (the host launches entries that share accumulators one at a time): results are
// bitwise reproducible.
#include "device_utils.cuh"

namespace lorm_ext::cuda {
namespace {

namespace panel {
constexpr int kCols = kPanelColumns;       // Gram columns per block, one per thread of a row group
constexpr int kGroups = kThreads / kCols;  // row groups, each walking a quarter of every row slice
constexpr int kChunk = kPanelChunk;        // factor rows per pass (accumulators per thread)
constexpr int kSlice = 64;                 // Gram rows per staged slice of the factor
constexpr int kGroupRows = kSlice / kGroups;
constexpr int kBatch = 8;  // Gram rows a thread loads before using them (loads in flight)
static_assert(kGroupRows % kBatch == 0, "a group's rows come in whole batches");
}  // namespace panel

template <typename acc_t>
__device__ __forceinline__ void load16(const acc_t* p, acc_t (&v)[panel::kChunk]);
template <>
__device__ __forceinline__ void load16<float>(const float* p, float (&v)[panel::kChunk]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float4 q = reinterpret_cast<const float4*>(p)[i];
    v[4 * i] = q.x, v[4 * i + 1] = q.y, v[4 * i + 2] = q.z, v[4 * i + 3] = q.w;
  }
}
template <>
__device__ __forceinline__ void load16<double>(const double* p, double (&v)[panel::kChunk]) {
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const double2 q = reinterpret_cast<const double2*>(p)[i];
    v[2 * i] = q.x, v[2 * i + 1] = q.y;
  }
}

// sum[k + u][c] += g[u] for the rows k + u < n of a contiguous (n, n) sum. Every old value is loaded before
// any is stored, so the loads are not held back behind stores the compiler cannot prove distinct.
template <typename acc_t>
__device__ __forceinline__ void add_rows(acc_t* sum, int64_t k, int64_t c, int64_t n, const acc_t (&g)[panel::kBatch]) {
  acc_t old[panel::kBatch];
#pragma unroll
  for (int u = 0; u < panel::kBatch; ++u) {
    old[u] = k + u < n ? sum[(k + u) * n + c] : acc_t(0);
  }
#pragma unroll
  for (int u = 0; u < panel::kBatch; ++u) {
    if (k + u < n) {
      sum[(k + u) * n + c] = old[u] + g[u];
    }
  }
}

template <typename input_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 2) merge_panel_kernel(PanelParams params) {
  // The factor slice transposed, [row][factor row], padded to keep 16-byte rows and few bank conflicts.
  constexpr int kPitch = panel::kChunk + 16 / static_cast<int>(sizeof(acc_t));
  __shared__ __align__(16) acc_t factor_s[panel::kSlice * kPitch];
  __shared__ acc_t product_s[panel::kGroups][panel::kChunk][panel::kCols];

  const PanelLayer layer = params.items[find_item(params)];
  const int64_t panel_index = blockIdx.x - layer.first_block;
  const int64_t n = layer.n, p = layer.p, c0 = panel_index * panel::kCols;
  const int col = threadIdx.x % panel::kCols, group = threadIdx.x / panel::kCols;
  const int64_t c = c0 + col;
  const bool in = c < n;
  const auto* gram = static_cast<const input_t*>(layer.gram);
  auto* gram_sum = static_cast<acc_t*>(layer.gram_sum);
  const auto* factor = static_cast<const acc_t*>(layer.factor);
  auto* out = static_cast<acc_t*>(layer.out);

  // p = 0 still takes one pass, for the Gram sum.
  for (int64_t q0 = 0; q0 < p || q0 == 0; q0 += panel::kChunk) {
    const int chunk_rows = static_cast<int>(p - q0 < panel::kChunk ? p - q0 : panel::kChunk);
    const bool add_sum = gram_sum != nullptr && q0 == 0;
    acc_t acc[panel::kChunk] = {};
    __syncthreads();  // product_s of the previous chunk is read to the end
    if (layer.diagonal) {
      if (group == 0 && in) {
        const acc_t g = upcast<acc_t>(gram[c * layer.stride0]);
        if (add_sum) {
          gram_sum[c] += g;
        }
#pragma unroll
        for (int q = 0; q < panel::kChunk; ++q) {
          if (q < chunk_rows) {
            acc[q] = factor[(q0 + q) * n + c] * g;
          }
        }
      }
    } else {
      for (int64_t k0 = 0; k0 < n; k0 += panel::kSlice) {
        __syncthreads();  // factor_s of the previous slice is read to the end
        for (int e = threadIdx.x; e < panel::kSlice * panel::kChunk; e += kThreads) {
          const int q = e / panel::kSlice, kk = e % panel::kSlice;
          factor_s[kk * kPitch + q] = q < chunk_rows && k0 + kk < n ? factor[(q0 + q) * n + k0 + kk] : acc_t(0);
        }
        __syncthreads();
        if (in) {
          for (int b = 0; b < panel::kGroupRows; b += panel::kBatch) {
            const int kk = group * panel::kGroupRows + b;
            const int64_t k = k0 + kk;
            acc_t g[panel::kBatch];
#pragma unroll
            for (int u = 0; u < panel::kBatch; ++u) {
              g[u] = k + u < n ? upcast<acc_t>(gram[(k + u) * layer.stride0 + c * layer.stride1]) : acc_t(0);
            }
            if (add_sum) {
              add_rows(gram_sum, k, c, n, g);
            }
#pragma unroll
            for (int u = 0; u < panel::kBatch; ++u) {
              acc_t f[panel::kChunk];
              load16(factor_s + (kk + u) * kPitch, f);
#pragma unroll
              for (int q = 0; q < panel::kChunk; ++q) {
                acc[q] = fma(f[q], g[u], acc[q]);
              }
            }
          }
        }
      }
    }

    // (F G)[q][c] = the four groups' partial sums, added in a fixed order.
#pragma unroll
    for (int q = 0; q < panel::kChunk; ++q) {
      product_s[group][q][col] = acc[q];
    }
    __syncthreads();
    for (int e = threadIdx.x; e < panel::kChunk * panel::kCols; e += kThreads) {
      const int q = e / panel::kCols, cc = e % panel::kCols;
      const acc_t v = product_s[0][q][cc] + product_s[1][q][cc] + product_s[2][q][cc] + product_s[3][q][cc];
      product_s[0][q][cc] = v;  // only this thread touches (q, cc) in this loop
      if (q < chunk_rows && c0 + cc < n) {
        if (params.mode == kAddToOut) {
          out[(q0 + q) * n + c0 + cc] += v;
        } else if (params.mode == kStoreToOut) {
          out[(q0 + q) * n + c0 + cc] = v;
        }
      }
    }
    if (params.mode == kProjectPartials) {
      __syncthreads();
      const int width = static_cast<int>(n - c0 < panel::kCols ? n - c0 : panel::kCols);
      for (int64_t e = threadIdx.x; e < chunk_rows * p; e += kThreads) {
        const int q = static_cast<int>(e / p);
        const int64_t s = e % p;
        acc_t sum = 0;
        for (int cc = 0; cc < width; ++cc) {
          sum = fma(product_s[0][q][cc], factor[s * n + c0 + cc], sum);
        }
        out[(panel_index * p + q0 + q) * p + s] = sum;
      }
    }
  }
}

// P = the sum of a layer's per-panel partials, in panel order; projection_sums += P, and P is kept for B P.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) reduce_partials_kernel(ReduceParams params) {
  const ReduceLayer layer = params.items[find_item(params)];
  const int64_t e = (blockIdx.x - layer.first_block) * kThreads + threadIdx.x;
  if (e >= layer.elements) {
    return;
  }
  const auto* partials = static_cast<const acc_t*>(layer.partials);
  acc_t v = 0;
  for (int64_t panel_index = 0; panel_index < layer.panels; ++panel_index) {
    v += partials[panel_index * layer.elements + e];
  }
  static_cast<acc_t*>(layer.sum)[e] += v;
  static_cast<acc_t*>(layer.projection)[e] = v;
}

// out (m, w) += left (m, p) @ mid (p, w), one output element per thread: the small products that finish
// weighted_sums (L (F G) and B P).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) accumulate_product_kernel(ProductParams params) {
  const ProductLayer layer = params.items[find_item(params)];
  const int64_t e = (blockIdx.x - layer.first_block) * kThreads + threadIdx.x;
  if (e >= layer.m * layer.w) {
    return;
  }
  const int64_t o = e / layer.w, c = e % layer.w;
  const auto* left = static_cast<const acc_t*>(layer.left) + o * layer.p;
  const auto* mid = static_cast<const acc_t*>(layer.mid) + c;
  acc_t v = 0;
  for (int64_t q = 0; q < layer.p; ++q) {
    v = fma(left[q], mid[q * layer.w], v);
  }
  static_cast<acc_t*>(layer.out)[e] += v;
}

}  // namespace

template <typename input_t, typename acc_t>
cudaError_t PanelLaunch<input_t, acc_t>::launch(const PanelParams& params, int64_t blocks, cudaStream_t stream) {
  merge_panel_kernel<input_t, acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

template <typename acc_t>
cudaError_t FinishLaunch<acc_t>::reduce(const ReduceParams& params, int64_t blocks, cudaStream_t stream) {
  reduce_partials_kernel<acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

template <typename acc_t>
cudaError_t FinishLaunch<acc_t>::product(const ProductParams& params, int64_t blocks, cudaStream_t stream) {
  accumulate_product_kernel<acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

template struct PanelLaunch<Half16, float>;
template struct PanelLaunch<Half16, double>;
template struct PanelLaunch<BFloat16, float>;
template struct PanelLaunch<BFloat16, double>;
template struct PanelLaunch<float, float>;
template struct PanelLaunch<float, double>;
template struct PanelLaunch<double, float>;
template struct PanelLaunch<double, double>;
template struct FinishLaunch<float>;
template struct FinishLaunch<double>;

}  // namespace lorm_ext::cuda
