// Integer helpers shared by the CPU kernels and the CUDA kernels (host and device code).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LORM_EXT_HOST_DEVICE __host__ __device__
#else
#define LORM_EXT_HOST_DEVICE
#endif

namespace lorm_ext {

LORM_EXT_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

}  // namespace lorm_ext
