// CUDA Gram accumulation, composed of ATen calls (custom kernels replace this in their own issue).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"

namespace lorm_ext {
namespace {

void gram_accumulate_cuda(at::TensorList grams, at::TensorList inputs) {
  check_gram_accumulate_args(grams, inputs);
  for (size_t i = 0; i < grams.size(); ++i) {
    at::Tensor gram = grams[i].detach();
    const at::Tensor x = inputs[i].detach().reshape({-1, gram.size(0)}).to(gram.scalar_type());
    if (is_diagonal_gram(gram)) {
      gram.add_(x.square().sum(0));
    } else {
      gram.addmm_(x.t(), x);
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(lorm_ext, CUDA, m) {
  m.impl("gram_accumulate_", &gram_accumulate_cuda);
}

}  // namespace lorm_ext
