// CPU streaming merge accumulators. Each client Gram is read once, one column block at a time, and the block
// feeds every sum that needs it while it is in cache. Blocks of all layers form one task list for
// at::parallel_for, so many small layers and a few wide ones share the threads. Diagonal Grams are
// elementwise and use plain (internally parallel) ATen ops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "tiling.h"

namespace lorm_ext {
namespace {

// Columns of a client Gram handled per task: a (n × 256) block of a 3072-wide fp32 Gram is 3 MiB.
constexpr int64_t kColumnBlock = 256;

struct ColumnBlock {
  size_t layer;
  int64_t begin;
  int64_t width;
};

// Column blocks of every full (2-D) Gram in the list.
std::vector<ColumnBlock> column_blocks(at::TensorList grams) {
  std::vector<ColumnBlock> blocks;
  for (size_t layer = 0; layer < grams.size(); ++layer) {
    if (is_diagonal_gram(grams[layer])) {
      continue;
    }
    const int64_t n = grams[layer].size(0);
    for (int64_t c = 0; c < n; c += kColumnBlock) {
      blocks.push_back({layer, c, std::min(kColumnBlock, n - c)});
    }
  }
  return blocks;
}

// Runs body(block) for every column block, spread over threads.
template <typename Body>
void for_each_column_block(const std::vector<ColumnBlock>& blocks, const Body& body) {
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      body(blocks[b]);
    }
  });
}

// Detached copies of the small per-layer matrices in each accumulator's dtype, made once before the
// parallel region (a no-op view when the dtype already matches).
std::vector<at::Tensor> in_dtype_of(at::TensorList values, at::TensorList accumulators) {
  std::vector<at::Tensor> out;
  out.reserve(values.size());
  for (size_t i = 0; i < values.size(); ++i) {
    out.push_back(values[i].detach().to(accumulators[i].scalar_type()));
  }
  return out;
}

void gram_weighted_accumulate_cpu(
    at::TensorList gram_sums,
    at::TensorList weighted_sums,
    at::TensorList grams,
    at::TensorList factors,
    at::TensorList lefts) {
  check_gram_weighted_accumulate_args(gram_sums, weighted_sums, grams, factors, lefts);
  const bool has_lefts = !lefts.empty();
  std::vector<at::Tensor> accumulators(gram_sums.begin(), gram_sums.end());
  accumulators.insert(accumulators.end(), weighted_sums.begin(), weighted_sums.end());
  if (gram_sums.size() > 1 && any_overlap(accumulators)) {
    // Entries share an accumulator: their column blocks must not run in parallel, so one entry at a time.
    for (size_t i = 0; i < gram_sums.size(); ++i) {
      gram_weighted_accumulate_cpu(
          gram_sums[i], weighted_sums[i], grams[i], factors[i], has_lefts ? at::TensorList(lefts[i]) : at::TensorList());
    }
    return;
  }
  const auto factor = in_dtype_of(factors, gram_sums);
  const auto left = has_lefts ? in_dtype_of(lefts, gram_sums) : std::vector<at::Tensor>{};

  for_each_column_block(column_blocks(grams), [&](const ColumnBlock& blk) {
    const size_t i = blk.layer;
    const auto dtype = gram_sums[i].scalar_type();
    const at::Tensor g = grams[i].detach().narrow(1, blk.begin, blk.width).to(dtype);
    gram_sums[i].detach().narrow(1, blk.begin, blk.width).add_(g);
    const at::Tensor fg = at::mm(factor[i], g);
    at::Tensor out = weighted_sums[i].detach().narrow(1, blk.begin, blk.width);
    if (has_lefts) {
      out.addmm_(left[i], fg);
    } else {
      out.add_(fg);
    }
  });

  for (size_t i = 0; i < grams.size(); ++i) {
    if (!is_diagonal_gram(grams[i])) {
      continue;
    }
    const at::Tensor g = grams[i].detach().to(gram_sums[i].scalar_type());
    gram_sums[i].detach().add_(g);
    const at::Tensor fg = factor[i] * g;
    if (has_lefts) {
      weighted_sums[i].detach().addmm_(left[i], fg);
    } else {
      weighted_sums[i].detach().add_(fg);
    }
  }
}

void projected_accumulate_cpu(
    at::TensorList projection_sums,
    at::TensorList weighted_sums,
    at::TensorList grams,
    at::TensorList shared_factors,
    at::TensorList factors) {
  check_projected_accumulate_args(projection_sums, weighted_sums, grams, shared_factors, factors);
  const auto shared = in_dtype_of(shared_factors, projection_sums);
  const auto factor = in_dtype_of(factors, projection_sums);

  // A G for every layer (r × n): the one pass over each full Gram.
  std::vector<at::Tensor> shared_gram(grams.size());
  for (size_t i = 0; i < grams.size(); ++i) {
    shared_gram[i] = is_diagonal_gram(grams[i])
        ? shared[i] * grams[i].detach().to(shared[i].scalar_type())
        : at::empty_like(shared[i]);
  }
  for_each_column_block(column_blocks(grams), [&](const ColumnBlock& blk) {
    const size_t i = blk.layer;
    const at::Tensor g = grams[i].detach().narrow(1, blk.begin, blk.width).to(shared[i].scalar_type());
    at::Tensor out = shared_gram[i].narrow(1, blk.begin, blk.width);
    at::mm_out(out, shared[i], g);
  });

  // P = (A G) Aᵀ is r × r: the rest is tiny next to the pass above.
  for (size_t i = 0; i < grams.size(); ++i) {
    const at::Tensor projection = at::mm(shared_gram[i], shared[i].t());
    projection_sums[i].detach().add_(projection);
    weighted_sums[i].detach().addmm_(factor[i], projection);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(lorm_ext, CPU, m) {
  m.impl("gram_weighted_accumulate_", &gram_weighted_accumulate_cpu);
  m.impl("projected_accumulate_", &projected_accumulate_cpu);
}

}  // namespace lorm_ext
