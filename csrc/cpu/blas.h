// BLAS GEMM as exported by torch's CPU library (MKL or OpenBLAS), called single-threaded from inside the CPU
// kernels' own parallel loops (SingleThreadedBlas). Weak: where a torch build does not export them, blas_gemm returns
// false and the caller uses ATen instead.
#pragma once

#include <cstdint>
#include <type_traits>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c, const int* ldc)
    __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
// MKL's thread count for the calling thread only (0: back to the global setting); returns the previous one.
// Fortran convention (argument by reference): the C name is an alias of it in torch's MKL.
int mkl_set_num_threads_local_(const int* threads) __attribute__((weak));
}

namespace lorm_ext {

// While alive, BLAS calls from this thread run on this thread alone. The CPU kernels' parallel loops call BLAS
// from every worker; MKL would otherwise start its own threads inside each call (it does not see the enclosing
// OpenMP region as one), oversubscribing the cores. Without MKL: nothing to do.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas() {
    if (mkl_set_num_threads_local_ != nullptr) {
      const int one = 1;
      previous_ = mkl_set_num_threads_local_(&one);
    }
  }
  ~SingleThreadedBlas() {
    if (mkl_set_num_threads_local_ != nullptr) {
      mkl_set_num_threads_local_(&previous_);
    }
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int previous_ = 0;
};

// C = op(A) op(B) + beta C in BLAS's column-major terms (m × n result, k the inner dimension); false when this
// torch exports no BLAS.
template <typename T>
bool blas_gemm(char transa, char transb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
               int64_t ldb, T beta, T* c, int64_t ldc) {
  const int m32 = static_cast<int>(m), n32 = static_cast<int>(n), k32 = static_cast<int>(k);
  const int lda32 = static_cast<int>(lda), ldb32 = static_cast<int>(ldb), ldc32 = static_cast<int>(ldc);
  const T one = 1;
  if constexpr (std::is_same_v<T, double>) {
    if (dgemm_ == nullptr) {
      return false;
    }
    dgemm_(&transa, &transb, &m32, &n32, &k32, &one, a, &lda32, b, &ldb32, &beta, c, &ldc32);
  } else {
    if (sgemm_ == nullptr) {
      return false;
    }
    sgemm_(&transa, &transb, &m32, &n32, &k32, &one, a, &lda32, b, &ldb32, &beta, c, &ldc32);
  }
  return true;
}

}  // namespace lorm_ext
