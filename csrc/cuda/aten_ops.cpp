// The ATen implementation of the CUDA ops, and the choice between it and the custom kernels (aten_ops.h).
// Layers are handled one after another in list order, so entries that share an accumulator need nothing
// special. float32 products go through cuBLAS as torch's matmul precision setting says (TF32 is off unless a
// program turns it on).
#include "aten_ops.h"

#include <ATen/ops/mm.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <limits>
#include <vector>

#include "../checks.h"

namespace lorm_ext::cuda {
namespace {

constexpr const char* kVariable = "LORM_EXT_CUDA_KERNELS";

Kernels parse_kernels(const std::string& name, const char* what) {
  TORCH_CHECK(name == "aten" || name == "custom", what, " must be 'aten' or 'custom', got '", name, "'");
  return name == "aten" ? Kernels::Aten : Kernels::Custom;
}

Kernels kernels_from_environment() {
  const char* value = std::getenv(kVariable);
  return value == nullptr || *value == '\0' ? Kernels::Aten : parse_kernels(value, kVariable);
}

std::atomic<int> chosen_kernels{-1};  // set_kernels' choice, -1 while there is none

// Panel width of the ATen Gram update: n (n + width) / 2 products per Gram instead of n².
constexpr int64_t kPanelWidth = 1024;

}  // namespace

Kernels kernels() {
  const int chosen = chosen_kernels.load();
  if (chosen >= 0) {
    return static_cast<Kernels>(chosen);
  }
  // A throwing initialiser leaves the static uninitialised: an invalid value fails every call.
  static const Kernels from_environment = kernels_from_environment();
  return from_environment;
}

void set_kernels(const std::string& name) {
  chosen_kernels.store(static_cast<int>(parse_kernels(name, "the CUDA kernel choice")));
}

const char* kernels_name(Kernels choice) {
  return choice == Kernels::Aten ? "aten" : "custom";
}

namespace aten {

// G += XᵀX with an exactly symmetric update, as the custom kernels make it: the upper triangle in column
// panels, X[:, :c1]ᵀ X[:, c0:c1], each panel's block above the diagonal added to G and, transposed, to its
// mirror; of the diagonal block only the upper triangle is used, mirrored likewise.
void gram_accumulate(at::TensorList grams, at::TensorList inputs) {
  for (size_t i = 0; i < grams.size(); ++i) {
    const at::Tensor& gram = grams[i];
    const int64_t n = gram.size(0);
    if (n == 0 || inputs[i].numel() == 0) {
      continue;
    }
    // The op's upcast, here as a copy of X in G's dtype (the custom kernels upcast tile by tile).
    const at::Tensor x = inputs[i].detach().reshape({-1, n}).to(gram.scalar_type());
    if (is_diagonal_gram(gram)) {
      gram.add_(x.to(at::kDouble).square().sum(0));  // squares and their sum in float64, as the custom kernel
      continue;
    }
    for (int64_t c0 = 0; c0 < n; c0 += kPanelWidth) {
      const int64_t width = std::min(kPanelWidth, n - c0);
      const at::Tensor panel = at::mm(x.narrow(1, 0, c0 + width).mT(), x.narrow(1, c0, width));
      const at::Tensor above = panel.narrow(0, 0, c0);
      gram.narrow(0, 0, c0).narrow(1, c0, width).add_(above);
      gram.narrow(0, c0, width).narrow(1, 0, c0).add_(above.mT());
      const at::Tensor block = panel.narrow(0, c0, width);
      gram.narrow(0, c0, width).narrow(1, c0, width).add_(block.triu()).add_(block.triu(1).mT());
    }
  }
}

// m G for a full Gram, m · diag(G) for a diagonal one (both ATen merge sums need it).
at::Tensor times_gram(const at::Tensor& m, const at::Tensor& gram) {
  return is_diagonal_gram(gram) ? m.mul(gram) : at::mm(m, gram);
}

void gram_weighted_accumulate(at::TensorList gram_sums, at::TensorList weighted_sums, at::TensorList grams,
                              at::TensorList factors, at::TensorList lefts) {
  for (size_t i = 0; i < gram_sums.size(); ++i) {
    const auto acc = gram_sums[i].scalar_type();
    const at::Tensor gram = grams[i].detach().to(acc);
    const at::Tensor factor = factors[i].detach().to(acc);
    const bool diagonal = is_diagonal_gram(gram);
    gram_sums[i].add_(gram);
    if (lefts.empty()) {
      diagonal ? weighted_sums[i].addcmul_(factor, gram) : weighted_sums[i].addmm_(factor, gram);
    } else {
      weighted_sums[i].addmm_(lefts[i].detach().to(acc), times_gram(factor, gram));
    }
  }
}

void projected_accumulate(at::TensorList projection_sums, at::TensorList weighted_sums, at::TensorList grams,
                          at::TensorList shared_a, at::TensorList factors_b) {
  for (size_t i = 0; i < projection_sums.size(); ++i) {
    const auto acc = projection_sums[i].scalar_type();
    const at::Tensor gram = grams[i].detach().to(acc);
    const at::Tensor a = shared_a[i].detach().to(acc);
    const at::Tensor projection = at::mm(times_gram(a, gram), a.mT());
    projection_sums[i].add_(projection);
    weighted_sums[i].addmm_(factors_b[i].detach().to(acc), projection);
  }
}

// [max |G − Gᵀ|, min diag, max diag, non-finite count], non-finite entries left out of the first three.
at::Tensor gram_stats(at::TensorList grams) {
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<at::Tensor> rows;
  for (const auto& gram : grams) {
    const at::Tensor values = gram.detach().to(at::kDouble);
    const at::Tensor finite = values.isfinite();
    const bool diagonal = is_diagonal_gram(values);
    const at::Tensor entries = diagonal ? values : values.diagonal();
    const at::Tensor entries_finite = diagonal ? finite : finite.diagonal();
    const at::Tensor asymmetry =
        diagonal ? at::zeros({}, values.options())
                 : at::where(finite.logical_and(finite.mT()), values.sub(values.mT()).abs(), 0.0).amax();
    rows.push_back(
        at::stack({asymmetry, at::where(entries_finite, entries, inf).amin(),
                   at::where(entries_finite, entries, -inf).amax(), finite.logical_not().sum().to(at::kDouble)}));
  }
  return at::stack(rows);
}

}  // namespace aten
}  // namespace lorm_ext::cuda
