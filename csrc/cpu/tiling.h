// How the CPU kernels cut an n-wide matrix into tiles for at::parallel_for, and how their hot loops are built.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "../integer_math.h"
#include "blas.h"

// The hot loops of the CPU kernels are compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2, FMA) and baseline
// x86-64; the loader picks the best the machine runs (GCC function multiversioning). torch builds
// extensions for baseline x86-64 only, which leaves most of a modern core's vector width unused.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LORM_EXT_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LORM_EXT_CPU_CLONES
#endif

namespace lorm_ext {

// Scratch memory for BLAS operands: `elements` values at a 64-byte boundary inside `buffer`, which grows as needed
// and is kept by the caller between uses. The alignment is fixed because MKL's results may depend on the
// alignment of its operands, and a merge must give the same bits in every process.
constexpr int64_t kScratchAlignment = 64;
template <typename T>
T* aligned_scratch(std::vector<T>& buffer, int64_t elements) {
  const int64_t pad = kScratchAlignment / static_cast<int64_t>(sizeof(T));
  if (static_cast<int64_t>(buffer.size()) < elements + pad) {
    buffer.resize(elements + pad);
  }
  const auto address = reinterpret_cast<uintptr_t>(buffer.data());
  return reinterpret_cast<T*>((address + kScratchAlignment - 1) & ~static_cast<uintptr_t>(kScratchAlignment - 1));
}

// n rounded up so that consecutive scratch regions of T stay 64-byte aligned.
template <typename T>
int64_t aligned_count(int64_t n) {
  const int64_t step = kScratchAlignment / static_cast<int64_t>(sizeof(T));
  return ceil_div(n, step) * step;
}

// Work below this many element operations (multiply-adds, or values read) runs on the calling thread alone: waking
// the other threads and joining them costs more than they would save.
constexpr int64_t kMinParallelWork = int64_t{1} << 16;

// Runs run_task(t) for t in [0, count) on the intra-op threads (all of the tasks together doing about `work` element
// operations), each thread pulling the next index from one queue until none is left, BLAS single-threaded inside
// when there is more than one worker. Pulling keeps both threads busy when one of them is descheduled on a shared
// machine (a fixed split of the work waits for it). Callers order the tasks largest first, so the last ones are
// small.
template <typename RunTask>
void pull_tasks(int64_t count, int64_t work, const RunTask& run_task) {
  std::atomic<int64_t> next{0};
  const int64_t workers =
      work < kMinParallelWork ? std::min<int64_t>(1, count) : std::min<int64_t>(at::get_num_threads(), count);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    // One worker runs where it was called, and BLAS inside its tasks may use the other threads.
    std::optional<SingleThreadedBlas> single;
    if (workers > 1) {
      single.emplace();
    }
    for (int64_t t = next++; t < count; t = next++) {
      run_task(t);
    }
  });
}

// (i, j) tile indices with i <= j: the blocks of the upper triangle.
inline std::vector<std::pair<int64_t, int64_t>> upper_triangle_tiles(int64_t n, int64_t tile) {
  const int64_t t = ceil_div(n, tile);
  std::vector<std::pair<int64_t, int64_t>> pairs;
  pairs.reserve(t * (t + 1) / 2);
  for (int64_t i = 0; i < t; ++i) {
    for (int64_t j = i; j < t; ++j) {
      pairs.emplace_back(i, j);
    }
  }
  return pairs;
}

}  // namespace lorm_ext
