// CUDA Gram accumulation kernels: G += XᵀX in place (host side: ops_cuda.cu).
//
// A launch covers many (G, X) pairs: each contributes the upper-triangle tiles (ti <= tj) of its Gram,
// times its number of row splits, to a 1-D grid (see kernels.cuh). A block computes one tile over its rows
// and adds it to G at (ti, tj) and, mirrored, at (tj, ti).
//
//   tensor-core kernel  half/bfloat16 X, float32 G. 128×128 tiles, mma.sync m16n8k16 with fp32 accumulate.
//                       The products of two 16-bit inputs are exact in fp32; each 32-row slice is summed
//                       on the tensor cores from zero and then added into separate fp32 accumulators with
//                       ordinary round-to-nearest adds, so the tensor cores' own accumulation rounding only
//                       ever touches 32-term partial sums. Needs sm_80: compiled for an older architecture
//                       its mma is a trap, and the host sends 16-bit inputs to the SIMT kernel instead.
//   SIMT kernel         every other combination (float32 X into float32 G; anything into float64 G):
//                       64×64 tiles, X upcast to G's dtype as it is loaded, exact FMA in G's dtype. No TF32.
//   diagonal kernel     1-D G: column sums of squares, accumulated in float64 per thread.
//
// X is read through its two strides, so any 2-D view works without a copy. Rows beyond a block's range
// and features beyond n are loaded as zeros; every store into G is bounds-checked.
// When a launch has too few tiles to fill the GPU, the host splits tiles over rows: each block then stores
// its tile in a workspace slot, and the split reduction adds the slots into G in split order. Every
// element of G thus gets one plain add per launch, in a fixed order: results are bitwise reproducible,
// and G stays exactly symmetric.
#include <type_traits>

#include "device_utils.cuh"

namespace lorm_ext::cuda {
namespace {

// What one block does: tile number `tile` (upper-triangle order, or a column block) of one pair, over rows
// [row_begin, row_end) = row split number `split`.
struct TileWork {
  GramPair pair;
  int64_t split;
  int tile;
  int64_t row_begin;
  int64_t row_end;
  int ti;
  int tj;
};

// Blocks of one pair are ordered split-major, so blocks running together share the same rows of X in L2.
__device__ __forceinline__ TileWork tile_work(const GramParams& params, bool triangle) {
  TileWork w;
  w.pair = params.items[find_item(params)];
  const int64_t local = blockIdx.x - w.pair.first_block;
  w.split = local / w.pair.split_tiles;
  w.tile = static_cast<int>(local % w.pair.split_tiles);
  w.row_begin = w.split * w.pair.rows_per_split;
  w.row_end = min64(w.pair.rows, w.row_begin + w.pair.rows_per_split);
  if (triangle) {
    triangle_tile(w.pair.tiles, w.tile, w.ti, w.tj);
  } else {
    w.ti = w.tj = w.tile;
  }
  return w;
}

// This block's workspace slot when its pair's rows are split (see GramPair::partials).
template <typename acc_t>
__device__ __forceinline__ acc_t* partial_slot(const TileWork& w, int64_t slot_elements) {
  return static_cast<acc_t*>(w.pair.partials) + (w.split * w.pair.split_tiles + w.tile) * slot_elements;
}

// Adds a rows × cols tile staged in shared memory (row pitch `pitch`, odd so that the column reads of the
// mirrored pass hit distinct banks) to G at (i0, j0) and, when `mirror`, its transpose at (j0, i0). Both
// passes walk G along its rows, so the writes coalesce.
template <typename acc_t>
__device__ void add_staged_tile(const acc_t* staged, int pitch, int rows, int cols, acc_t* gram, int64_t n, int64_t i0,
                                int64_t j0, bool mirror) {
  for (int e = threadIdx.x; e < rows * cols; e += kThreads) {
    const int a = e / cols, b = e % cols;
    if (i0 + a < n && j0 + b < n) {
      gram[(i0 + a) * n + (j0 + b)] += staged[a * pitch + b];
    }
  }
  if (mirror) {
    for (int e = threadIdx.x; e < rows * cols; e += kThreads) {
      const int b = e / rows, a = e % rows;
      if (i0 + a < n && j0 + b < n) {
        gram[(j0 + b) * n + (i0 + a)] += staged[a * pitch + b];
      }
    }
  }
}

// A block's staged result (rows × cols, rows first_row.. of its tile) goes into G, or into its workspace
// slot, a tile_side × tile_side row-major tile, when its pair's rows are split.
template <typename acc_t>
__device__ void flush_staged_tile(const TileWork& w, const acc_t* staged, int pitch, int rows, int cols, int tile_side,
                                  int first_row) {
  if (w.pair.partials == nullptr) {
    add_staged_tile(staged, pitch, rows, cols, static_cast<acc_t*>(w.pair.gram), w.pair.n,
                    int64_t{w.ti} * tile_side + first_row, int64_t{w.tj} * tile_side, w.ti != w.tj);
    return;
  }
  acc_t* slot = partial_slot<acc_t>(w, int64_t{tile_side} * tile_side) + int64_t{first_row} * tile_side;
  for (int e = threadIdx.x; e < rows * cols; e += kThreads) {
    slot[(e / cols) * tile_side + e % cols] = staged[(e / cols) * pitch + e % cols];
  }
}

// ------------------------------------------------------------------------------------ tensor-core kernel

namespace tc {
constexpr int kTile = kTensorCoreShape.tile;      // 128: G tile side (features)
constexpr int kRows = kTensorCoreShape.row_step;  // 32 rows of X per main-loop step: two m16n8k16 k-steps
static_assert(kTile == 128 && kRows == 32, "the warp layout below is written for 128 x 128 tiles, 32 rows");
// Shared memory holds each operand feature-major: word [f * kPitch + p] packs X[2p][f] (low half) and
// X[2p+1][f] (high half), i.e. the (k, k+1) pairs the mma fragments take. 16 words of data + 4 of padding:
// with a pitch of 20 words, the fragment loads (8 features × 4 pairs per warp) hit 32 distinct banks.
constexpr int kPitch = 20;
constexpr int kOperandWords = kTile * kPitch;
constexpr int kStagePitch = kTile + 1;  // epilogue staging: 64 rows × 129 floats, within the 40 KiB above
}  // namespace tc

template <typename input_t>
struct MmaOp;

template <>
struct MmaOp<BFloat16> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();  // no mma.sync m16n8k16 before sm_80; the host never launches this (kernel_support)
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
  }
};

template <>
struct MmaOp<Half16> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();  // no mma.sync m16n8k16 before sm_80; the host never launches this (kernel_support)
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
  }
};

// This thread's share of one step for one operand: rows r, r+1 (r = row0 + 2 * (lane % 16)) of the 8
// features f0 + 8 * fb, fb = 2 * warp + lane / 16 (so 8 warps cover 128 features), packed into 8 pair
// words. Rows >= row_end and features >= n read as zero.
__device__ __forceinline__ void load_pairs(const GramPair& pair, int64_t f0, int64_t row0, int64_t row_end,
                                           uint32_t (&w)[8]) {
  const int lane = threadIdx.x % 32;
  const int64_t f = f0 + 8 * (2 * (threadIdx.x / 32) + lane / 16);
  const int64_t r = row0 + 2 * (lane % 16);
  const bool in0 = r < row_end, in1 = r + 1 < row_end;
  const auto* x = static_cast<const uint16_t*>(pair.x);
  if (pair.vector_loads && f + 8 <= pair.n) {
    const uint4 zero = make_uint4(0, 0, 0, 0);
    const uint4 lo = in0 ? __ldg(reinterpret_cast<const uint4*>(x + r * pair.stride_row + f)) : zero;
    const uint4 hi = in1 ? __ldg(reinterpret_cast<const uint4*>(x + (r + 1) * pair.stride_row + f)) : zero;
    // lo.x holds features f, f+1 of row r (low, high halves); pair them with row r+1's.
    const uint32_t los[4] = {lo.x, lo.y, lo.z, lo.w}, his[4] = {hi.x, hi.y, hi.z, hi.w};
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      w[2 * v] = __byte_perm(los[v], his[v], 0x5410);
      w[2 * v + 1] = __byte_perm(los[v], his[v], 0x7632);
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const bool col = f + j < pair.n;
      const int64_t offset = (f + j) * pair.stride_col;
      const uint32_t a = in0 && col ? x[r * pair.stride_row + offset] : 0;
      const uint32_t b = in1 && col ? x[(r + 1) * pair.stride_row + offset] : 0;
      w[j] = a | (b << 16);
    }
  }
}

// Writes load_pairs' words to their feature rows. The upper half-warp stores in the order j + 4 so that
// the two half-warps (same pair index p, features 8 apart) land 16 banks apart: conflict-free.
__device__ __forceinline__ void store_pairs(uint32_t* operand, const uint32_t (&w)[8]) {
  const int lane = threadIdx.x % 32;
  const int fb = 2 * (threadIdx.x / 32) + lane / 16;
  const int p = lane % 16;
  const bool upper = lane >= 16;
#pragma unroll
  for (int s = 0; s < 8; ++s) {
    const int j = upper ? (s + 4) % 8 : s;
    operand[(8 * fb + j) * tc::kPitch + p] = upper ? w[(s + 4) % 8] : w[s];
  }
}

// One 32-row step: the warp's 64×32 block of the tile (warp_m = warp / 4 picks 64 rows, warp_n = warp % 4
// picks 32 columns) from zero on the tensor cores, then added to `acc` in fp32.
template <typename input_t>
__device__ __forceinline__ void mma_step(const uint32_t* si, const uint32_t* sj, float (&acc)[4][4][4]) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int row0 = (threadIdx.x / 32) / 4 * 64, col0 = (threadIdx.x / 32) % 4 * 32;
  float part[4][4][4] = {};
#pragma unroll
  for (int ks = 0; ks < 2; ++ks) {
    const int k = ks * 8 + t;  // pair word of k-elements (2t, 2t+1) of this k-step; +4 is (2t+8, 2t+9)
    uint32_t a[4][4], b[4][2];
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
      const uint32_t* top = si + (row0 + mi * 16 + g) * tc::kPitch + k;
      const uint32_t* bottom = top + 8 * tc::kPitch;
      a[mi][0] = top[0];     // a0 a1: row g,     k 2t..2t+1
      a[mi][1] = bottom[0];  // a2 a3: row g + 8, k 2t..2t+1
      a[mi][2] = top[4];     // a4 a5: row g,     k 2t+8..2t+9
      a[mi][3] = bottom[4];  // a6 a7: row g + 8, k 2t+8..2t+9
    }
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) {
      const uint32_t* column = sj + (col0 + ni * 8 + g) * tc::kPitch + k;
      b[ni][0] = column[0];  // b0 b1: k 2t..2t+1,   column g
      b[ni][1] = column[4];  // b2 b3: k 2t+8..2t+9, column g
    }
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        MmaOp<input_t>::run(part[mi][ni], a[mi], b[ni]);
      }
    }
  }
#pragma unroll
  for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        acc[mi][ni][v] += part[mi][ni][v];
      }
    }
  }
}

template <typename input_t>
__global__ void __launch_bounds__(kThreads, 1) gram_tensor_core_kernel(GramParams params) {
  // [stage][operand i / j][feature * kPitch + pair]: 40 KiB, reused for the epilogue.
  __shared__ __align__(16) uint32_t smem[2][2][tc::kOperandWords];
  const TileWork work = tile_work(params, /*triangle=*/true);
  const GramPair& pair = work.pair;
  const int64_t steps = ceil_div(work.row_end - work.row_begin, tc::kRows);
  const int64_t i0 = int64_t{work.ti} * tc::kTile, j0 = int64_t{work.tj} * tc::kTile;
  const bool diagonal_tile = work.ti == work.tj;  // then operand j is operand i: loaded once

  float acc[4][4][4] = {};
  uint32_t next_i[8], next_j[8];
  load_pairs(pair, i0, work.row_begin, work.row_end, next_i);
  store_pairs(smem[0][0], next_i);
  if (!diagonal_tile) {
    load_pairs(pair, j0, work.row_begin, work.row_end, next_j);
    store_pairs(smem[0][1], next_j);
  }
  __syncthreads();
  // Register double buffering: step s+1's loads are in flight while step s computes from shared memory;
  // the buffer written at step s was last read at step s-1, which the barrier ending step s-1 closed.
  for (int64_t s = 0; s < steps; ++s) {
    const int cur = s % 2;
    const bool more = s + 1 < steps;
    if (more) {
      const int64_t row = work.row_begin + (s + 1) * tc::kRows;
      load_pairs(pair, i0, row, work.row_end, next_i);
      if (!diagonal_tile) {
        load_pairs(pair, j0, row, work.row_end, next_j);
      }
    }
    mma_step<input_t>(smem[cur][0], diagonal_tile ? smem[cur][0] : smem[cur][1], acc);
    if (more) {
      store_pairs(smem[1 - cur][0], next_i);
      if (!diagonal_tile) {
        store_pairs(smem[1 - cur][1], next_j);
      }
    }
    __syncthreads();
  }

  // Epilogue in two halves of 64 rows (warps with warp_m = half), staged so that G is written row-wise.
  float* staged = reinterpret_cast<float*>(&smem[0][0][0]);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  for (int half = 0; half < 2; ++half) {
    if (warp / 4 == half) {
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          const int row = mi * 16 + g, col = (warp % 4) * 32 + ni * 8 + 2 * t;
          // c0 c1: (g, 2t..2t+1); c2 c3: (g + 8, 2t..2t+1)
          staged[row * tc::kStagePitch + col] = acc[mi][ni][0];
          staged[row * tc::kStagePitch + col + 1] = acc[mi][ni][1];
          staged[(row + 8) * tc::kStagePitch + col] = acc[mi][ni][2];
          staged[(row + 8) * tc::kStagePitch + col + 1] = acc[mi][ni][3];
        }
      }
    }
    __syncthreads();
    flush_staged_tile(work, staged, tc::kStagePitch, 64, tc::kTile, tc::kTile, half * 64);
    __syncthreads();
  }
}

// ------------------------------------------------------------------------------------------ SIMT kernel

namespace simt {
constexpr int kTile = kSimtShape.tile;
constexpr int kRows = kSimtShape.row_step;
static_assert(kTile == 64 && kRows == 16, "the thread layout below is written for 64 x 64 tiles, 16 rows");
constexpr int kOperand = kRows * kTile;  // one operand of one stage: [row][feature]
constexpr int kStagePitch = kTile + 1;
constexpr int kSmem = kTile * kStagePitch;  // >= 4 operands (2 stages × i, j) = 4096
static_assert(kSmem >= 4 * kOperand, "epilogue staging must cover the main-loop buffers");
}  // namespace simt

template <typename acc_t>
__device__ __forceinline__ void load4(const acc_t* p, acc_t (&v)[4]);
template <>
__device__ __forceinline__ void load4<float>(const float* p, float (&v)[4]) {
  const float4 q = *reinterpret_cast<const float4*>(p);
  v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
}
template <>
__device__ __forceinline__ void load4<double>(const double* p, double (&v)[4]) {
  const double2 q0 = reinterpret_cast<const double2*>(p)[0], q1 = reinterpret_cast<const double2*>(p)[1];
  v[0] = q0.x, v[1] = q0.y, v[2] = q1.x, v[3] = q1.y;
}

// This thread's 4 elements of one step for one operand: element e = threadIdx.x + 256 q is
// (row e / 64, feature e % 64), so a warp reads 32 consecutive features of one row.
template <typename input_t, typename acc_t>
__device__ __forceinline__ void load_upcast(const GramPair& pair, int64_t f0, int64_t row0, int64_t row_end,
                                            acc_t (&v)[4]) {
  const auto* x = static_cast<const input_t*>(pair.x);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int e = threadIdx.x + kThreads * q;
    const int64_t r = row0 + e / simt::kTile, f = f0 + e % simt::kTile;
    v[q] = r < row_end && f < pair.n ? upcast<acc_t>(x[r * pair.stride_row + f * pair.stride_col]) : acc_t(0);
  }
}

template <typename acc_t>
__device__ __forceinline__ void store4(acc_t* operand, const acc_t (&v)[4]) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    operand[threadIdx.x + kThreads * q] = v[q];
  }
}

template <typename input_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) gram_simt_kernel(GramParams params) {
  __shared__ __align__(16) acc_t smem[simt::kSmem];
  auto operand = [&](int stage, int which) { return smem + (2 * stage + which) * simt::kOperand; };
  const TileWork work = tile_work(params, /*triangle=*/true);
  const GramPair& pair = work.pair;
  const int64_t steps = ceil_div(work.row_end - work.row_begin, simt::kRows);
  const int64_t i0 = int64_t{work.ti} * simt::kTile, j0 = int64_t{work.tj} * simt::kTile;
  const bool diagonal_tile = work.ti == work.tj;
  // Thread (ty, tx) owns rows 4 ty.. and columns 4 tx.. of the tile.
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;

  acc_t acc[4][4] = {};
  acc_t next_i[4], next_j[4];
  load_upcast<input_t>(pair, i0, work.row_begin, work.row_end, next_i);
  store4(operand(0, 0), next_i);
  if (!diagonal_tile) {
    load_upcast<input_t>(pair, j0, work.row_begin, work.row_end, next_j);
    store4(operand(0, 1), next_j);
  }
  __syncthreads();
  // Same double buffering as the tensor-core kernel.
  for (int64_t s = 0; s < steps; ++s) {
    const int cur = s % 2;
    const bool more = s + 1 < steps;
    if (more) {
      const int64_t row = work.row_begin + (s + 1) * simt::kRows;
      load_upcast<input_t>(pair, i0, row, work.row_end, next_i);
      if (!diagonal_tile) {
        load_upcast<input_t>(pair, j0, row, work.row_end, next_j);
      }
    }
    const acc_t* si = operand(cur, 0);
    const acc_t* sj = diagonal_tile ? si : operand(cur, 1);
#pragma unroll
    for (int k = 0; k < simt::kRows; ++k) {
      acc_t a[4], b[4];
      load4(si + k * simt::kTile + 4 * ty, a);
      load4(sj + k * simt::kTile + 4 * tx, b);
#pragma unroll
      for (int u = 0; u < 4; ++u) {
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          acc[u][v] = fma(a[u], b[v], acc[u][v]);
        }
      }
    }
    if (more) {
      store4(operand(1 - cur, 0), next_i);
      if (!diagonal_tile) {
        store4(operand(1 - cur, 1), next_j);
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int u = 0; u < 4; ++u) {
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      smem[(4 * ty + u) * simt::kStagePitch + 4 * tx + v] = acc[u][v];
    }
  }
  __syncthreads();
  flush_staged_tile(work, smem, simt::kStagePitch, simt::kTile, simt::kTile, simt::kTile, 0);
}

// -------------------------------------------------------------------------------------- diagonal kernel

namespace diag {
constexpr int kCols = kDiagonalShape.tile;       // columns per block: one per lane of a warp
constexpr int kLanes = kDiagonalShape.row_step;  // rows walked in parallel, one per warp
static_assert(kCols * kLanes == kThreads, "one thread per (row lane, column)");
}  // namespace diag

template <typename input_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) gram_diagonal_kernel(GramParams params) {
  __shared__ double partial[diag::kLanes][diag::kCols];
  const TileWork work = tile_work(params, /*triangle=*/false);
  const GramPair& pair = work.pair;
  const int col = threadIdx.x % diag::kCols, lane = threadIdx.x / diag::kCols;
  const int64_t c = int64_t{work.ti} * diag::kCols + col;
  const auto* x = static_cast<const input_t*>(pair.x);
  double sum = 0;
  if (c < pair.n) {
#pragma unroll 4
    for (int64_t r = work.row_begin + lane; r < work.row_end; r += diag::kLanes) {
      // Rounded to G's dtype first, as the reference upcasts X before squaring.
      const double v = upcast<acc_t>(x[r * pair.stride_row + c * pair.stride_col]);
      sum = fma(v, v, sum);
    }
  }
  partial[lane][col] = sum;
  __syncthreads();
  if (lane == 0) {
    double total = 0;
#pragma unroll
    for (int l = 0; l < diag::kLanes; ++l) {
      total += partial[l][col];
    }
    if (pair.partials != nullptr) {
      partial_slot<acc_t>(work, diag::kCols)[col] = static_cast<acc_t>(total);  // the whole slot, zeros past n
    } else if (c < pair.n) {
      static_cast<acc_t*>(pair.gram)[c] += static_cast<acc_t>(total);
    }
  }
}

// ----------------------------------------------------------------------------------- split reduction

// For each tile of a split pair, the sum of its slots in split order, added into G as the unsplit kernel
// would have: kReduceRows rows of the tile per block (tile and mirror), or a whole column block.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) gram_reduce_splits_kernel(GramParams params, GramShape shape) {
  constexpr int kPitch = kTensorCoreShape.tile + 1;  // the widest tile, odd as add_staged_tile wants
  __shared__ acc_t staged[kReduceRows * kPitch];
  const GramPair pair = params.items[find_item(params)];
  const int64_t local = blockIdx.x - pair.first_block;
  const int64_t splits = ceil_div(pair.rows, pair.rows_per_split);
  const int64_t slot_elements = tile_elements(shape);
  const auto* partials = static_cast<const acc_t*>(pair.partials);
  auto* gram = static_cast<acc_t*>(pair.gram);
  const int64_t chunks = reduce_blocks_per_tile(shape);
  const int tile = static_cast<int>(local / chunks);
  const int first_row = static_cast<int>(local % chunks) * kReduceRows;
  auto sum_slots = [&](int64_t offset) {
    acc_t v = 0;
    for (int64_t s = 0; s < splits; ++s) {
      v += partials[(s * pair.split_tiles + tile) * slot_elements + offset];
    }
    return v;
  };
  if (!shape.triangle) {
    const int64_t c = int64_t{tile} * shape.tile + threadIdx.x;
    if (threadIdx.x < shape.tile && c < pair.n) {
      gram[c] += sum_slots(threadIdx.x);
    }
    return;
  }
  int ti, tj;
  triangle_tile(pair.tiles, tile, ti, tj);
  for (int e = threadIdx.x; e < kReduceRows * shape.tile; e += kThreads) {
    const int a = e / shape.tile, b = e % shape.tile;
    staged[a * kPitch + b] = sum_slots(int64_t{first_row + a} * shape.tile + b);
  }
  __syncthreads();
  add_staged_tile(staged, kPitch, kReduceRows, shape.tile, gram, pair.n, int64_t{ti} * shape.tile + first_row,
                  int64_t{tj} * shape.tile, ti != tj);
}

}  // namespace

cudaError_t kernel_support(int* simt_arch, int* tensor_core_arch) {
  cudaFuncAttributes simt{}, tensor_core{};
  cudaError_t status = cudaFuncGetAttributes(&simt, gram_simt_kernel<float, float>);
  if (status == cudaSuccess) {
    status = cudaFuncGetAttributes(&tensor_core, gram_tensor_core_kernel<BFloat16>);
  }
  *simt_arch = simt.ptxVersion;
  *tensor_core_arch = tensor_core.ptxVersion;
  return status;
}

template <typename input_t, typename acc_t>
cudaError_t GramLaunch<input_t, acc_t>::resident_blocks(GramKernel kernel, int* blocks_per_sm) {
  constexpr bool tensor_core =
      std::is_same_v<acc_t, float> && (std::is_same_v<input_t, Half16> || std::is_same_v<input_t, BFloat16>);
  switch (kernel) {
    case GramKernel::TensorCore:
      if constexpr (tensor_core) {
        return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks_per_sm, gram_tensor_core_kernel<input_t>, kThreads,
                                                             0);
      }
      return cudaErrorInvalidValue;
    case GramKernel::Simt:
      return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks_per_sm, gram_simt_kernel<input_t, acc_t>, kThreads,
                                                           0);
    case GramKernel::Diagonal:
      return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks_per_sm, gram_diagonal_kernel<input_t, acc_t>,
                                                           kThreads, 0);
  }
  return cudaErrorInvalidValue;
}

template <typename input_t, typename acc_t>
cudaError_t GramLaunch<input_t, acc_t>::launch(GramKernel kernel, const GramParams& params, int64_t blocks,
                                               cudaStream_t stream) {
  constexpr bool tensor_core =
      std::is_same_v<acc_t, float> && (std::is_same_v<input_t, Half16> || std::is_same_v<input_t, BFloat16>);
  const dim3 grid(static_cast<unsigned>(blocks));
  switch (kernel) {
    case GramKernel::TensorCore:
      if constexpr (tensor_core) {
        gram_tensor_core_kernel<input_t><<<grid, kThreads, 0, stream>>>(params);
        return cudaGetLastError();
      }
      return cudaErrorInvalidValue;
    case GramKernel::Simt:
      gram_simt_kernel<input_t, acc_t><<<grid, kThreads, 0, stream>>>(params);
      return cudaGetLastError();
    case GramKernel::Diagonal:
      gram_diagonal_kernel<input_t, acc_t><<<grid, kThreads, 0, stream>>>(params);
      return cudaGetLastError();
  }
  return cudaErrorInvalidValue;
}

template <typename input_t, typename acc_t>
cudaError_t GramLaunch<input_t, acc_t>::reduce_splits(GramKernel kernel, const GramParams& params, int64_t blocks,
                                                      cudaStream_t stream) {
  gram_reduce_splits_kernel<acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(params, gram_shape(kernel));
  return cudaGetLastError();
}

template struct GramLaunch<Half16, float>;
template struct GramLaunch<Half16, double>;
template struct GramLaunch<BFloat16, float>;
template struct GramLaunch<BFloat16, double>;
template struct GramLaunch<float, float>;
template struct GramLaunch<float, double>;
template struct GramLaunch<double, float>;
template struct GramLaunch<double, double>;

}  // namespace lorm_ext::cuda
