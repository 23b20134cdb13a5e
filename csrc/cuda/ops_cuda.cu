// Host side of the CUDA ops: checks, the choice between the ATen implementation (aten_ops.cpp) and the custom
// kernels, grouping of the list entries into launches, scheduling, workspaces and registration. The kernels
// are in gram_kernel.cu, merge_kernel.cu and gram_stats_kernel.cu (interface: kernels.cuh).
//
// This file has no device code. The guard keeps the torch headers out of nvcc's device passes, which would
// otherwise parse them once per GPU architecture (most of the build time of a .cu that includes torch).
#ifndef __CUDA_ARCH__

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "aten_ops.h"
#include "kernels.cuh"

namespace lorm_ext::cuda {
namespace {

#define LORM_EXT_DISPATCH_INPUT(TYPE, NAME, ...)                             \
  [&] {                                                                      \
    switch (TYPE) {                                                          \
      case at::kHalf: {                                                      \
        using input_t = Half16;                                              \
        return __VA_ARGS__();                                                \
      }                                                                      \
      case at::kBFloat16: {                                                  \
        using input_t = BFloat16;                                            \
        return __VA_ARGS__();                                                \
      }                                                                      \
      case at::kFloat: {                                                     \
        using input_t = float;                                               \
        return __VA_ARGS__();                                                \
      }                                                                      \
      case at::kDouble: {                                                    \
        using input_t = double;                                              \
        return __VA_ARGS__();                                                \
      }                                                                      \
      default: TORCH_CHECK(false, NAME, ": unsupported input dtype ", TYPE); \
    }                                                                        \
  }()

#define LORM_EXT_DISPATCH_ACC(TYPE, NAME, ...)                                     \
  [&] {                                                                            \
    switch (TYPE) {                                                                \
      case at::kFloat: {                                                           \
        using acc_t = float;                                                       \
        return __VA_ARGS__();                                                      \
      }                                                                            \
      case at::kDouble: {                                                          \
        using acc_t = double;                                                      \
        return __VA_ARGS__();                                                      \
      }                                                                            \
      default: TORCH_CHECK(false, NAME, ": unsupported accumulator dtype ", TYPE); \
    }                                                                              \
  }()

// How a group of list entries (accumulators[e] are entry e's) is cut into launches: all at once, or one
// entry per launch in list order when an accumulator of one entry shares memory with another's (the same
// Gram twice, say). So no two blocks of a launch ever add to the same element: the kernels need no atomics.
std::vector<std::vector<size_t>> launch_batches(const std::vector<std::vector<at::Tensor>>& accumulators) {
  std::vector<at::Tensor> all;
  for (const auto& entry : accumulators) {
    all.insert(all.end(), entry.begin(), entry.end());
  }
  const bool shared = any_overlap(all);
  std::vector<std::vector<size_t>> batches;
  for (size_t e = 0; e < accumulators.size(); ++e) {
    if (shared || batches.empty()) {
      batches.emplace_back();
    }
    batches.back().push_back(e);
  }
  return batches;
}

template <typename T>
std::vector<T> select(const std::vector<T>& items, const std::vector<size_t>& positions) {
  std::vector<T> out;
  for (size_t e : positions) {
    out.push_back(items[e]);
  }
  return out;
}

// Launches `launch(params, blocks)` for the items with at least one block, kMaxItems per launch, numbering
// each launch's blocks from 0.
template <typename Params, typename Item, typename BlocksOf, typename Launch>
void launch_items(const std::vector<Item>& items, BlocksOf blocks_of, Launch launch, const char* op) {
  std::vector<Item> busy;
  for (const auto& item : items) {
    if (blocks_of(item) > 0) {
      busy.push_back(item);
    }
  }
  Params params{};
  for (size_t begin = 0; begin < busy.size(); begin += kMaxItems) {
    const size_t end = std::min(busy.size(), begin + kMaxItems);
    int64_t blocks = 0;
    for (size_t i = begin; i < end; ++i) {
      params.items[i - begin] = busy[i];
      params.items[i - begin].first_block = blocks;
      blocks += blocks_of(busy[i]);
    }
    params.count = static_cast<int>(end - begin);
    TORCH_CHECK(blocks <= INT32_MAX, op, ": too much work for one launch (", blocks, " blocks)");
    C10_CUDA_CHECK(launch(params, blocks));
  }
}

void* element_ptr(const at::Tensor& t, int64_t offset) {
  return static_cast<char*>(t.mutable_data_ptr()) + offset * t.element_size();
}

// ------------------------------------------------------------------------------------ kernel choice

struct DeviceSupport {
  bool custom;        // this build holds code of the custom kernels for the device
  bool tensor_cores;  // ... and of the tensor-core Gram kernel's body (compiled for sm_80 or newer)
};

// Asked once per device; a device that cannot run all of the custom kernels says so once, with what runs
// instead.
DeviceSupport device_support(c10::DeviceIndex device) {
  static std::mutex mutex;
  static std::map<c10::DeviceIndex, DeviceSupport> known;
  const std::lock_guard<std::mutex> lock(mutex);
  if (const auto it = known.find(device); it != known.end()) {
    return it->second;
  }
  const c10::cuda::CUDAGuard guard(device);
  int major = 0, minor = 0, simt_arch = 0, tensor_core_arch = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  const cudaError_t status = kernel_support(&simt_arch, &tensor_core_arch);
  const DeviceSupport support{status == cudaSuccess, status == cudaSuccess && tensor_core_arch >= 80};
  if (!support.custom) {
    (void)cudaGetLastError();  // not sticky: clear it so that the next launch check does not report it
    TORCH_WARN("lorm_ext: this build has no code of its custom CUDA kernels for cuda:", static_cast<int>(device),
               " (sm_", major, minor, ": ", cudaGetErrorString(status),
               "); the ops use the ATen implementation on it (rebuild "
               "with TORCH_CUDA_ARCH_LIST=\"",
               major, ".", minor, "\" for the custom kernels)");
  } else if (!support.tensor_cores) {
    TORCH_WARN("lorm_ext: cuda:", static_cast<int>(device), " (sm_", major, minor, ") runs code compiled for sm_",
               tensor_core_arch,
               ", which has no mma.sync m16n8k16 (sm_80): 16-bit Gram inputs take the SIMT kernel on it");
  }
  known.emplace(device, support);
  return support;
}

// Whether a call whose entries live on `device` runs the custom kernels.
bool use_custom(const c10::Device& device) {
  return kernels() == Kernels::Custom && device_support(device.index()).custom;
}

// -------------------------------------------------------------------------------------- gram_accumulate_

// Fewer rows per split would make storing and re-reading a split's tile cost about as much as computing it.
constexpr int64_t kMinRowsPerSplit = 256;

struct GramJob {
  at::Tensor gram;
  at::Tensor x;  // (rows, n)
};

int64_t row_splits(const GramPair& p) {
  return ceil_div(p.rows, p.rows_per_split);
}

// One descriptor per job. Rows are split (by the same factor for every pair of the launch) only as far as
// needed for about two waves of resident blocks.
std::vector<GramPair> schedule(const std::vector<GramJob>& jobs, GramShape shape, int64_t target_blocks) {
  int64_t tiles_total = 0;
  for (const auto& job : jobs) {
    const int64_t t = ceil_div(job.gram.size(0), shape.tile);
    tiles_total += shape.triangle ? t * (t + 1) / 2 : t;
  }
  const int64_t splits_wanted = std::max<int64_t>(1, ceil_div(target_blocks, std::max<int64_t>(tiles_total, 1)));
  std::vector<GramPair> pairs;
  for (const auto& job : jobs) {
    GramPair p{};
    p.gram = job.gram.mutable_data_ptr();
    p.x = job.x.const_data_ptr();
    p.rows = job.x.size(0);
    p.n = job.x.size(1);
    p.stride_row = job.x.stride(0);
    p.stride_col = job.x.stride(1);
    const int64_t t = ceil_div(p.n, shape.tile);
    p.tiles = static_cast<int32_t>(t);
    p.split_tiles = static_cast<int32_t>(shape.triangle ? t * (t + 1) / 2 : t);
    const int64_t splits = std::min(splits_wanted, std::max<int64_t>(1, p.rows / kMinRowsPerSplit));
    p.rows_per_split = ceil_div(ceil_div(p.rows, splits), shape.row_step) * shape.row_step;
    p.vector_loads = p.stride_col == 1 && p.stride_row % 8 == 0 && reinterpret_cast<uintptr_t>(p.x) % 16 == 0;
    pairs.push_back(p);
  }
  return pairs;
}

GramKernel gram_kernel_for(const at::Tensor& gram, const at::Tensor& x, bool tensor_cores) {
  if (is_diagonal_gram(gram)) {
    return GramKernel::Diagonal;
  }
  const bool half_input = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  return tensor_cores && half_input && gram.scalar_type() == at::kFloat ? GramKernel::TensorCore : GramKernel::Simt;
}

template <typename Launch>
void launch_gram_group(GramKernel kernel, const std::vector<GramJob>& jobs, const char* op) {
  const c10::Device device = jobs.front().gram.device();
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index());
  const GramShape shape = gram_shape(kernel);
  int per_sm = 0, sms = 0;
  C10_CUDA_CHECK(Launch::resident_blocks(kernel, &per_sm));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device.index()));
  const int64_t target_blocks = 2 * int64_t{std::max(per_sm, 1)} * sms;
  std::vector<std::vector<at::Tensor>> accumulators;
  for (const auto& job : jobs) {
    accumulators.push_back({job.gram});
  }
  for (const auto& batch : launch_batches(accumulators)) {
    auto pairs = schedule(select(jobs, batch), shape, target_blocks);
    // Workspace slots for the tiles of the pairs whose rows are split.
    int64_t slots = 0;
    for (const auto& p : pairs) {
      slots += row_splits(p) > 1 ? row_splits(p) * p.split_tiles * tile_elements(shape) : 0;
    }
    const at::Tensor partials = at::empty({slots}, jobs.front().gram.options());
    std::vector<GramPair> split_pairs;
    int64_t offset = 0;
    for (auto& p : pairs) {
      if (row_splits(p) > 1) {
        p.partials = element_ptr(partials, offset);
        offset += row_splits(p) * p.split_tiles * tile_elements(shape);
        split_pairs.push_back(p);
      }
    }
    launch_items<GramParams>(
        pairs, [](const GramPair& p) { return row_splits(p) * p.split_tiles; },
        [&](const GramParams& params, int64_t blocks) { return Launch::launch(kernel, params, blocks, stream); }, op);
    launch_items<GramParams>(
        split_pairs, [&](const GramPair& p) { return p.split_tiles * reduce_blocks_per_tile(shape); },
        [&](const GramParams& params, int64_t blocks) { return Launch::reduce_splits(kernel, params, blocks, stream); },
        op);
  }
}

void gram_accumulate_cuda(at::TensorList grams, at::TensorList inputs) {
  constexpr const char* op = "lorm_ext::gram_accumulate_";
  check_gram_accumulate_args(grams, inputs);
  if (!use_custom(grams[0].device())) {  // the dispatcher routes no empty list here
    return aten::gram_accumulate(grams, inputs);
  }
  const bool tensor_cores = device_support(grams[0].device().index()).tensor_cores;
  // One group of launches per (kernel, input dtype, Gram dtype, device); list order is kept within a group.
  std::map<std::tuple<int, int, int, int>, std::vector<GramJob>> groups;
  for (size_t i = 0; i < grams.size(); ++i) {
    const at::Tensor gram = grams[i].detach();
    const int64_t n = gram.size(0);
    if (n == 0 || inputs[i].numel() == 0) {
      continue;
    }
    // A view whenever X's strides allow one; otherwise a copy in X's own dtype (never an upcast copy).
    const at::Tensor x = inputs[i].detach().reshape({-1, n});
    const GramKernel kernel = gram_kernel_for(gram, x, tensor_cores);
    const auto key = std::make_tuple(static_cast<int>(kernel), static_cast<int>(x.scalar_type()),
                                     static_cast<int>(gram.scalar_type()), static_cast<int>(gram.device().index()));
    groups[key].push_back({gram, x});
  }
  for (const auto& [key, jobs] : groups) {
    const auto kernel = static_cast<GramKernel>(std::get<0>(key));
    LORM_EXT_DISPATCH_INPUT(jobs.front().x.scalar_type(), op, [&] {
      LORM_EXT_DISPATCH_ACC(jobs.front().gram.scalar_type(), op,
                            [&] { launch_gram_group<GramLaunch<input_t, acc_t>>(kernel, jobs, op); });
    });
  }
}

// ------------------------------------------------------------------------------------------- merge ops

int64_t panels_of(int64_t n) {
  return ceil_div(n, kPanelColumns);
}

PanelLayer panel_layer(const at::Tensor& gram, void* gram_sum, const at::Tensor& factor, void* out) {
  PanelLayer l{};
  l.gram = gram.const_data_ptr();
  l.diagonal = is_diagonal_gram(gram);
  l.stride0 = gram.stride(0);
  l.stride1 = l.diagonal ? 0 : gram.stride(1);
  l.gram_sum = gram_sum;
  l.factor = factor.const_data_ptr();
  l.out = out;
  l.n = gram.size(0);
  l.p = factor.size(0);
  return l;
}

template <typename input_t, typename acc_t>
void launch_panels(std::vector<PanelLayer> layers, PanelOut mode, cudaStream_t stream, const char* op) {
  // Widest Grams (most rows walked per block) first, so that they do not form the last wave.
  auto work = [](const PanelLayer& l) { return l.n * ceil_div(std::max<int64_t>(l.p, 1), kPanelChunk); };
  std::stable_sort(layers.begin(), layers.end(), [&](const auto& a, const auto& b) { return work(a) > work(b); });
  // A layer with no factor rows and no Gram sum has nothing to compute.
  launch_items<PanelParams>(
      layers, [](const PanelLayer& l) { return l.p == 0 && l.gram_sum == nullptr ? 0 : panels_of(l.n); },
      [&](PanelParams& params, int64_t blocks) {
        params.mode = mode;
        return PanelLaunch<input_t, acc_t>::launch(params, blocks, stream);
      },
      op);
}

template <typename acc_t>
void launch_products(const std::vector<ProductLayer>& layers, cudaStream_t stream, const char* op) {
  launch_items<ProductParams>(
      layers, [](const ProductLayer& l) { return ceil_div(l.m * l.w, kThreads); },
      [&](const ProductParams& params, int64_t blocks) { return FinishLaunch<acc_t>::product(params, blocks, stream); },
      op);
}

template <typename acc_t>
void launch_reductions(const std::vector<ReduceLayer>& layers, cudaStream_t stream, const char* op) {
  launch_items<ReduceParams>(
      layers, [](const ReduceLayer& l) { return ceil_div(l.elements, kThreads); },
      [&](const ReduceParams& params, int64_t blocks) { return FinishLaunch<acc_t>::reduce(params, blocks, stream); },
      op);
}

// Layer indices grouped by (device, Gram dtype, accumulator dtype): one set of launches per group.
std::map<std::tuple<int, int, int>, std::vector<size_t>> group_layers(at::TensorList grams, at::TensorList sums) {
  std::map<std::tuple<int, int, int>, std::vector<size_t>> groups;
  for (size_t i = 0; i < grams.size(); ++i) {
    const auto key = std::make_tuple(static_cast<int>(sums[i].device().index()),
                                     static_cast<int>(grams[i].scalar_type()), static_cast<int>(sums[i].scalar_type()));
    groups[key].push_back(i);
  }
  return groups;
}

void gram_weighted_accumulate_cuda(at::TensorList gram_sums, at::TensorList weighted_sums, at::TensorList grams,
                                   at::TensorList factors, at::TensorList lefts) {
  constexpr const char* op = "lorm_ext::gram_weighted_accumulate_";
  check_gram_weighted_accumulate_args(gram_sums, weighted_sums, grams, factors, lefts);
  if (!use_custom(gram_sums[0].device())) {
    return aten::gram_weighted_accumulate(gram_sums, weighted_sums, grams, factors, lefts);
  }
  const bool has_lefts = !lefts.empty();
  for (const auto& [key, members] : group_layers(grams, gram_sums)) {
    const at::Tensor& first = gram_sums[members.front()];
    const c10::cuda::CUDAGuard guard(first.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(first.device().index());
    std::vector<std::vector<at::Tensor>> accumulators;
    int64_t staged = 0;  // elements of F G staged for L (F G)
    for (size_t i : members) {
      accumulators.push_back({gram_sums[i], weighted_sums[i]});
      staged += has_lefts ? factors[i].size(0) * grams[i].size(0) : 0;
    }
    const auto batches = launch_batches(accumulators);
    const at::Tensor workspace = at::empty({staged}, first.options());
    std::vector<at::Tensor> keep;  // converted factors, alive until the launches are queued
    std::vector<PanelLayer> layers;
    std::vector<ProductLayer> products;
    int64_t offset = 0;
    for (size_t i : members) {
      const at::Tensor gram = grams[i].detach();
      const at::Tensor factor = factors[i].detach().to(first.scalar_type()).contiguous();
      keep.push_back(factor);
      void* out = weighted_sums[i].mutable_data_ptr();
      if (has_lefts) {
        const at::Tensor left = lefts[i].detach().to(first.scalar_type()).contiguous();
        keep.push_back(left);
        void* product = element_ptr(workspace, offset);
        products.push_back({left.const_data_ptr(), product, out, left.size(0), left.size(1), gram.size(0), 0});
        offset += factor.size(0) * gram.size(0);
        out = product;
      }
      layers.push_back(panel_layer(gram, gram_sums[i].mutable_data_ptr(), factor, out));
    }
    LORM_EXT_DISPATCH_INPUT(grams[members.front()].scalar_type(), op, [&] {
      LORM_EXT_DISPATCH_ACC(first.scalar_type(), op, [&] {
        for (const auto& batch : batches) {
          launch_panels<input_t, acc_t>(select(layers, batch), has_lefts ? kStoreToOut : kAddToOut, stream, op);
          launch_products<acc_t>(has_lefts ? select(products, batch) : products, stream, op);
        }
      });
    });
  }
}

void projected_accumulate_cuda(at::TensorList projection_sums, at::TensorList weighted_sums, at::TensorList grams,
                               at::TensorList shared_a, at::TensorList factors_b) {
  constexpr const char* op = "lorm_ext::projected_accumulate_";
  check_projected_accumulate_args(projection_sums, weighted_sums, grams, shared_a, factors_b);
  if (!use_custom(projection_sums[0].device())) {
    return aten::projected_accumulate(projection_sums, weighted_sums, grams, shared_a, factors_b);
  }
  for (const auto& [key, members] : group_layers(grams, projection_sums)) {
    const at::Tensor& first = projection_sums[members.front()];
    const c10::cuda::CUDAGuard guard(first.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(first.device().index());
    std::vector<std::vector<at::Tensor>> accumulators;
    int64_t partial_elements = 0, projection_elements = 0;
    for (size_t i : members) {
      accumulators.push_back({projection_sums[i], weighted_sums[i]});
      const int64_t r = shared_a[i].size(0);
      partial_elements += panels_of(grams[i].size(0)) * r * r;
      projection_elements += r * r;
    }
    const auto batches = launch_batches(accumulators);
    const at::Tensor partials = at::empty({partial_elements}, first.options());
    const at::Tensor projections = at::empty({projection_elements}, first.options());
    std::vector<at::Tensor> keep;  // converted factors_b, alive until the launches are queued
    std::vector<PanelLayer> layers;
    std::vector<ReduceLayer> reductions;
    std::vector<ProductLayer> products;
    int64_t partial_offset = 0, projection_offset = 0;
    for (size_t i : members) {
      const at::Tensor gram = grams[i].detach();
      const at::Tensor a = shared_a[i].detach().to(first.scalar_type()).contiguous();
      const at::Tensor b = factors_b[i].detach().to(first.scalar_type()).contiguous();
      keep.push_back(a);
      keep.push_back(b);
      const int64_t n = gram.size(0), r = a.size(0), panels = panels_of(n);
      void* partial = element_ptr(partials, partial_offset);
      void* projection = element_ptr(projections, projection_offset);
      // With n = 0 there are no panels: the reduction sums none, so P = 0 as it should.
      layers.push_back(panel_layer(gram, nullptr, a, partial));
      reductions.push_back({partial, projection_sums[i].mutable_data_ptr(), projection, r * r, panels, 0});
      products.push_back({b.const_data_ptr(), projection, weighted_sums[i].mutable_data_ptr(), b.size(0), r, r, 0});
      partial_offset += panels * r * r;
      projection_offset += r * r;
    }
    LORM_EXT_DISPATCH_INPUT(grams[members.front()].scalar_type(), op, [&] {
      LORM_EXT_DISPATCH_ACC(first.scalar_type(), op, [&] {
        for (const auto& batch : batches) {
          launch_panels<input_t, acc_t>(select(layers, batch), kProjectPartials, stream, op);
          launch_reductions<acc_t>(select(reductions, batch), stream, op);
          launch_products<acc_t>(select(products, batch), stream, op);
        }
      });
    });
  }
}

// -------------------------------------------------------------------------------------------- gram_stats

at::Tensor gram_stats_cuda(at::TensorList grams) {
  constexpr const char* op = "lorm_ext::gram_stats";
  check_gram_stats_args(grams);  // the dispatcher never routes an empty list here
  const c10::Device device = grams[0].device();
  if (!use_custom(device)) {
    return aten::gram_stats(grams);
  }
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index());
  const at::Tensor out = at::empty({static_cast<int64_t>(grams.size()), 4}, grams[0].options().dtype(at::kDouble));
  auto* rows = reinterpret_cast<StatsPartial*>(out.mutable_data_ptr<double>());
  // One item per Gram, grouped by dtype: one launch (and its finishing launch) per group.
  std::vector<at::Tensor> keep;  // contiguous Grams, alive until the launches are queued
  std::map<int, std::vector<StatsItem>> groups;
  int64_t blocks = 0;
  for (size_t i = 0; i < grams.size(); ++i) {
    const at::Tensor gram = grams[i].detach().contiguous();
    keep.push_back(gram);
    StatsItem item{};
    item.gram = gram.const_data_ptr();
    item.out = rows + i;
    item.n = gram.size(0);
    item.diagonal = is_diagonal_gram(gram);
    const int64_t tiles = ceil_div(item.n, kStatsTile);
    item.tiles = static_cast<int32_t>(tiles);
    item.blocks = item.diagonal ? ceil_div(item.n, kStatsChunk) : tiles * (tiles + 1) / 2;
    item.first_block = blocks;  // the item's partials, until launch_items renumbers first_block per launch
    blocks += item.blocks;
    groups[static_cast<int>(gram.scalar_type())].push_back(item);
  }
  const at::Tensor partials = at::empty({blocks, 4}, out.options());
  for (auto& [dtype, items] : groups) {
    for (auto& item : items) {
      item.partials = reinterpret_cast<StatsPartial*>(partials.mutable_data_ptr<double>()) + item.first_block;
    }
    LORM_EXT_DISPATCH_INPUT(static_cast<at::ScalarType>(dtype), op, [&] {
      launch_items<StatsParams>(
          items, [](const StatsItem& item) { return item.blocks; },
          [&](const StatsParams& params, int64_t launch_blocks) {
            return StatsLaunch<input_t>::launch(params, launch_blocks, stream);
          },
          op);
    });
  }
  return out;
}

}  // namespace
}  // namespace lorm_ext::cuda

TORCH_LIBRARY_IMPL(lorm_ext, CUDA, m) {
  m.impl("gram_stats", &lorm_ext::cuda::gram_stats_cuda);
  m.impl("gram_accumulate_", &lorm_ext::cuda::gram_accumulate_cuda);
  m.impl("gram_weighted_accumulate_", &lorm_ext::cuda::gram_weighted_accumulate_cuda);
  m.impl("projected_accumulate_", &lorm_ext::cuda::projected_accumulate_cuda);
}

#endif  // __CUDA_ARCH__
