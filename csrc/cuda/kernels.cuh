// The interface between the host side of the CUDA ops (ops_cuda.cu, which sees torch) and the kernels
// (gram_kernel.cu, merge_kernel.cu, gram_stats_kernel.cu, which see only CUDA headers, so nvcc compiles them
// quickly): POD launch parameters and explicitly instantiated launchers, as in Dao-AILab/causal-conv1d.
//
// Grouped launches: the host fills one descriptor per layer with `first_block` increasing from 0, and the
// kernel's 1-D grid assigns block b to the last descriptor whose first_block <= b. Descriptors travel by
// value in the kernel parameters (CUDA >= 12.1 allows 32 KiB on sm_70+): no host-to-device copy, so a
// launch needs no synchronisation and can be captured in a CUDA graph (tests/test_cuda_kernels.py captures
// each op that launches them). Longer lists take several launches.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../integer_math.h"

// Build-time guards for what the kernels rely on; the run-time side is kernel_support() below.
#if !defined(CUDART_VERSION) || CUDART_VERSION < 12010
#error \
    "lorm_ext's CUDA kernels need CUDA >= 12.1: their launch descriptors (~10 KiB) exceed the 4 KiB of kernel parameters older toolkits allow (build with LORM_EXT_CUDA=0, or a newer toolkit)"
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700
#error \
    "lorm_ext's CUDA kernels need sm_70 or newer (kernel parameters over 4 KiB): drop the older architectures from TORCH_CUDA_ARCH_LIST"
#endif

namespace lorm_ext::cuda {

// Every kernel of the extension runs 256-thread blocks; the tile shapes are written for that.
constexpr int kThreads = 256;
// Descriptors per launch: about 10 KiB of kernel parameters (static_asserts below).
constexpr int kMaxItems = 128;
// CUDA's limit on a kernel's parameters (CUDA >= 12.1, sm_70 and newer).
constexpr size_t kMaxParamBytes = 32764;

// A launch's parameters: `count` descriptors of one kind, passed by value in the kernel's parameter space.
template <typename Item>
struct LaunchItems {
  int count;
  Item items[kMaxItems];
};

// 16-bit input types as raw bits (the same layout as at::Half / at::BFloat16).
struct Half16 {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

// ------------------------------------------------------------------------------------------ Gram

enum class GramKernel : int {
  TensorCore,  // half/bfloat16 X into a float32 G: mma.sync, 128 × 128 tiles
  Simt,        // everything else into a full G: FMA in G's dtype, 64 × 64 tiles
  Diagonal,    // 1-D G: column sums of squares
};

// Tile side (features) and rows per main-loop step of each Gram kernel; row splits are multiples of the
// latter. For the diagonal kernel a "tile" is a block of columns, and a step one row per row lane.
struct GramShape {
  int tile;
  int row_step;
  bool triangle;  // only tiles (ti <= tj) are scheduled
};
constexpr GramShape kTensorCoreShape{128, 32, true};
constexpr GramShape kSimtShape{64, 16, true};
constexpr GramShape kDiagonalShape{32, kThreads / 32, false};

constexpr GramShape gram_shape(GramKernel kernel) {
  return kernel == GramKernel::TensorCore ? kTensorCoreShape : kernel == GramKernel::Simt ? kSimtShape : kDiagonalShape;
}

// Accumulator elements of one block's result: a tile, or a block of columns.
constexpr int64_t tile_elements(GramShape shape) {
  return shape.triangle ? int64_t{shape.tile} * shape.tile : shape.tile;
}

// The split reduction sums a tile this many rows at a time (one block each); a column block in one go.
constexpr int kReduceRows = 32;
constexpr int64_t reduce_blocks_per_tile(GramShape shape) {
  return shape.triangle ? shape.tile / kReduceRows : 1;
}

struct GramPair {
  void* gram;     // acc_t, contiguous (n, n), or (n,) for the diagonal kernel
  const void* x;  // input_t, (rows, n) with strides (stride_row, stride_col) in elements
  int64_t rows;
  int64_t n;
  int64_t stride_row;
  int64_t stride_col;
  int64_t rows_per_split;  // a multiple of the kernel's row_step
  int64_t first_block;
  int32_t tiles;         // tiles per side
  int32_t split_tiles;   // blocks per row split: tiles (tiles + 1) / 2, or tiles for the diagonal kernel
  int32_t vector_loads;  // 16-byte loads are legal: unit column stride, 16-byte aligned rows
  // nullptr: each block adds its tile into G. Otherwise the rows are split over several blocks, each
  // stores its tile in slot [split][tile] of this acc_t workspace, and the split reduction adds the slots
  // into G in split order.
  void* partials;
};

using GramParams = LaunchItems<GramPair>;
static_assert(sizeof(GramParams) <= kMaxParamBytes, "GramParams must fit in a kernel's parameters");

// Launchers, instantiated for input_t in {Half16, BFloat16, float, double} and acc_t in {float, double};
// `kernel` must be TensorCore only for 16-bit inputs with acc_t = float. reduce_splits takes the pairs that
// have partials, reduce_blocks_per_tile(shape) blocks per tile.
template <typename input_t, typename acc_t>
struct GramLaunch {
  static cudaError_t resident_blocks(GramKernel kernel, int* blocks_per_sm);
  static cudaError_t launch(GramKernel kernel, const GramParams& params, int64_t blocks, cudaStream_t stream);
  static cudaError_t reduce_splits(GramKernel kernel, const GramParams& params, int64_t blocks, cudaStream_t stream);
};

// ------------------------------------------------------------------------------------------ merge

constexpr int kPanelColumns = 64;  // Gram columns per block of the panel kernel
constexpr int kPanelChunk = 16;    // factor rows per pass of the panel kernel over a Gram

// What the panel kernel does with (F G) for its columns.
enum PanelOut : int32_t {
  kAddToOut = 0,         // out (p, n) += F G
  kStoreToOut = 1,       // out (p, n) = F G, a workspace
  kProjectPartials = 2,  // out[panel] (p, p) = (F G)[:, panel] F[:, panel]ᵀ with F = A, a workspace
};

struct PanelLayer {
  const void* gram;  // input_t: (n, n) with strides (stride0, stride1), or diagonal (n,) with stride0
  int64_t stride0;
  int64_t stride1;
  void* gram_sum;      // acc_t, contiguous, shaped like gram; nullptr when no Gram sum is kept
  const void* factor;  // acc_t (p, n), contiguous
  void* out;           // acc_t, see PanelOut
  int64_t n;
  int64_t p;
  int64_t first_block;
  int32_t diagonal;
};

struct PanelParams : LaunchItems<PanelLayer> {
  int32_t mode;  // PanelOut
};
static_assert(sizeof(PanelParams) <= kMaxParamBytes, "PanelParams must fit in a kernel's parameters");

// P = the sum of one layer's per-panel partials in panel order; sum += P; projection = P.
struct ReduceLayer {
  const void* partials;  // acc_t [panels][r][r]
  void* sum;             // acc_t (r, r)
  void* projection;      // acc_t (r, r), a workspace
  int64_t elements;      // r * r
  int64_t panels;
  int64_t first_block;
};

using ReduceParams = LaunchItems<ReduceLayer>;
static_assert(sizeof(ReduceParams) <= kMaxParamBytes, "ReduceParams must fit in a kernel's parameters");

// out (m, w) += left (m, p) @ mid (p, w); all contiguous in acc_t.
struct ProductLayer {
  const void* left;
  const void* mid;
  void* out;
  int64_t m;
  int64_t p;
  int64_t w;
  int64_t first_block;
};

using ProductParams = LaunchItems<ProductLayer>;
static_assert(sizeof(ProductParams) <= kMaxParamBytes, "ProductParams must fit in a kernel's parameters");

// Instantiated for input_t in {Half16, BFloat16, float, double} and acc_t in {float, double}.
template <typename input_t, typename acc_t>
struct PanelLaunch {
  static cudaError_t launch(const PanelParams& params, int64_t blocks, cudaStream_t stream);
};

// Instantiated for acc_t in {float, double}.
template <typename acc_t>
struct FinishLaunch {
  static cudaError_t reduce(const ReduceParams& params, int64_t blocks, cudaStream_t stream);
  static cudaError_t product(const ProductParams& params, int64_t blocks, cudaStream_t stream);
};

// ------------------------------------------------------------------------------------------ gram_stats

constexpr int kStatsTile = 32;             // a block of a full Gram owns one 32 × 32 upper-triangle tile
constexpr int kStatsChunk = 4 * kThreads;  // a block of a diagonal Gram owns this many entries

// One block's statistics, combined per Gram by the finishing kernel.
struct StatsPartial {
  double max_asymmetry;
  double min_diagonal;
  double max_diagonal;
  double nonfinite;
};
static_assert(sizeof(StatsPartial) == 4 * sizeof(double), "a row of the op's (grams, 4) float64 result");

struct StatsItem {
  const void* gram;        // input_t, contiguous: (n, n), or (n,) when diagonal
  StatsPartial* partials;  // one per block of this Gram
  StatsPartial* out;       // this Gram's row of the result
  int64_t n;
  int64_t blocks;  // tiles * (tiles + 1) / 2, or ceil(n / kStatsChunk) when diagonal
  int64_t first_block;
  int32_t tiles;  // tiles per side
  int32_t diagonal;
};

using StatsParams = LaunchItems<StatsItem>;
static_assert(sizeof(StatsParams) <= kMaxParamBytes, "StatsParams must fit in a kernel's parameters");

// The statistics of all the Grams of one launch: one block per tile or chunk over all of them, then one
// block per Gram combining its partials in a fixed order into its row of the result. Instantiated for
// input_t in {Half16, BFloat16, float, double}.
template <typename input_t>
struct StatsLaunch {
  static cudaError_t launch(const StatsParams& params, int64_t blocks, cudaStream_t stream);
};

// ------------------------------------------------------------------------------------------ support

// What the current device can run of this build: `simt_arch` and `tensor_core_arch` are the virtual
// architectures (__CUDA_ARCH__ / 10) of the code the device would execute for the SIMT Gram kernel (all
// kernels but the tensor-core one are compiled alike) and for the tensor-core Gram kernel, whose mma.sync
// m16n8k16 exists only from 80 on (a trap below). An error means the build holds no code for this device.
cudaError_t kernel_support(int* simt_arch, int* tensor_core_arch);

}  // namespace lorm_ext::cuda
