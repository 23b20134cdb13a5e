// CUDA merge accumulators, composed of ATen calls (custom kernels replace this in their own issue).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"

namespace lorm_ext {
namespace {

void gram_weighted_accumulate_cuda(
    at::TensorList gram_sums,
    at::TensorList weighted_sums,
    at::TensorList grams,
    at::TensorList factors,
    at::TensorList lefts) {
  check_gram_weighted_accumulate_args(gram_sums, weighted_sums, grams, factors, lefts);
  for (size_t i = 0; i < grams.size(); ++i) {
    const auto dtype = gram_sums[i].scalar_type();
    const at::Tensor g = grams[i].detach().to(dtype);
    const at::Tensor f = factors[i].detach().to(dtype);
    gram_sums[i].detach().add_(g);
    const at::Tensor fg = is_diagonal_gram(g) ? f * g : at::mm(f, g);
    at::Tensor out = weighted_sums[i].detach();
    if (lefts.empty()) {
      out.add_(fg);
    } else {
      out.addmm_(lefts[i].detach().to(dtype), fg);
    }
  }
}

void projected_accumulate_cuda(
    at::TensorList projection_sums,
    at::TensorList weighted_sums,
    at::TensorList grams,
    at::TensorList shared_factors,
    at::TensorList factors) {
  check_projected_accumulate_args(projection_sums, weighted_sums, grams, shared_factors, factors);
  for (size_t i = 0; i < grams.size(); ++i) {
    const auto dtype = projection_sums[i].scalar_type();
    const at::Tensor g = grams[i].detach().to(dtype);
    const at::Tensor a = shared_factors[i].detach().to(dtype);
    const at::Tensor ag = is_diagonal_gram(g) ? a * g : at::mm(a, g);
    const at::Tensor projection = at::mm(ag, a.t());
    projection_sums[i].detach().add_(projection);
    weighted_sums[i].detach().addmm_(factors[i].detach().to(dtype), projection);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(lorm_ext, CUDA, m) {
  m.impl("gram_weighted_accumulate_", &gram_weighted_accumulate_cuda);
  m.impl("projected_accumulate_", &projected_accumulate_cuda);
}

}  // namespace lorm_ext
