#include "checks.h"

#include <ATen/Dispatch.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <utility>

namespace lorm_ext {
namespace {

bool is_accumulator_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble;
}

bool is_input_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

// An accumulator is written in place tile by tile, so it must own its memory contiguously.
void check_accumulator(const at::Tensor& t, const char* op, const char* name, size_t i) {
  TORCH_CHECK(is_accumulator_dtype(t.scalar_type()), op, ": ", name, "[", i, "] must be float32 or float64, got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, "[", i, "] must be contiguous");
}

void check_input(const at::Tensor& t, const char* op, const char* name, size_t i) {
  TORCH_CHECK(is_input_dtype(t.scalar_type()), op, ": ", name, "[", i,
              "] must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
}

void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, size_t i) {
  TORCH_CHECK(a.device() == b.device(), op, ": entry ", i, " mixes devices ", a.device(), " and ", b.device());
}

void check_gram_shape(const at::Tensor& gram, const char* op, const char* name, size_t i) {
  TORCH_CHECK(gram.dim() == 1 || (gram.dim() == 2 && gram.size(0) == gram.size(1)), op, ": ", name, "[", i,
              "] must be a square (n, n) Gram or a diagonal (n,), got shape ", gram.sizes());
}

void check_lengths(size_t expected, size_t got, const char* op, const char* name) {
  TORCH_CHECK(expected == got, op, ": ", name, " has ", got, " entries, expected ", expected);
}

// The dispatcher sends a whole list to one backend (CUDA if any entry is on a GPU), so all entries must
// live on the device of the first.
void check_one_device(at::TensorList tensors, const at::Tensor& first, const char* op, const char* name) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(tensors[i].device() == first.device(), op, ": ", name, "[", i, "] is on ", tensors[i].device(),
                " but entry 0 is on ", first.device(), "; all entries of one call must be on one device");
  }
}

// The byte range [first, last) a tensor's elements can occupy: exact for contiguous tensors, a superset for
// strided ones (so interleaved views of one buffer count as overlapping: refused, never silently wrong).
std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    last += (t.size(d) - 1) * std::abs(t.stride(d));
  }
  const auto first = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return {first, first + static_cast<uintptr_t>((last + 1) * t.element_size())};
}

bool overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || a.device() != b.device()) {
    return false;
  }
  const auto [a0, a1] = byte_span(a);
  const auto [b0, b1] = byte_span(b);
  return a0 < b1 && b0 < a1;
}

// An op reads its inputs while it writes its outputs, in tiles: an input that shares memory with any output (of
// any entry) would be read half-updated. Names the first such pair.
struct Named {
  const char* name;
  at::TensorList tensors;
};
void check_inputs_do_not_overlap_outputs(std::initializer_list<Named> inputs, std::initializer_list<Named> outputs,
                                         const char* op) {
  for (const auto& in : inputs) {
    for (size_t i = 0; i < in.tensors.size(); ++i) {
      for (const auto& out : outputs) {
        for (size_t j = 0; j < out.tensors.size(); ++j) {
          TORCH_CHECK(!overlap(in.tensors[i], out.tensors[j]), op, ": ", in.name, "[", i, "] shares memory with ",
                      out.name, "[", j, "], which the op writes; pass a copy (", in.name, "[", i, "].clone())");
        }
      }
    }
  }
}

void check_disjoint(at::TensorList sums, at::TensorList other_sums, const char* op) {
  for (size_t i = 0; i < sums.size(); ++i) {
    TORCH_CHECK(!any_overlap({sums[i], other_sums[i]}), op, ": the accumulators of entry ", i, " share memory");
  }
}

}  // namespace

double symmetry_tolerance(at::ScalarType dtype) {
  double tolerance = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "symmetry_tolerance", [&] {
    tolerance = std::sqrt(static_cast<double>(std::numeric_limits<scalar_t>::epsilon()));
  });
  return tolerance;
}

bool exceeds_symmetry_tolerance(double asymmetry, double max_diagonal, at::ScalarType dtype) {
  return asymmetry > symmetry_tolerance(dtype) * max_diagonal;
}

ValueCheck check_value_stats(const double* stats, at::ScalarType dtype, bool is_gram) {
  const double asymmetry = stats[0], min_diagonal = stats[1], max_diagonal = stats[2], non_finite = stats[3];
  if (non_finite != 0) {
    return {ValueProblem::kNonFinite, non_finite};
  }
  if (is_gram && min_diagonal < 0) {
    return {ValueProblem::kNegativeDiagonal, min_diagonal};
  }
  if (is_gram && exceeds_symmetry_tolerance(asymmetry, max_diagonal, dtype)) {
    return {ValueProblem::kAsymmetric, asymmetry};
  }
  return {ValueProblem::kNone, 0};
}

const char* value_problem_name(ValueProblem problem) {
  switch (problem) {
    case ValueProblem::kNone: return "none";
    case ValueProblem::kNonFinite: return "non_finite";
    case ValueProblem::kNegativeDiagonal: return "negative_diagonal";
    case ValueProblem::kAsymmetric: return "asymmetric";
  }
  return "unknown";
}

std::optional<EntryProblem> first_value_problem(at::TensorList grams, at::TensorList matrices) {
  // (entry index, tensor as gram_stats reads it) of the non-empty entries, grouped by device in first-seen order
  std::vector<std::pair<c10::Device, std::vector<std::pair<size_t, at::Tensor>>>> groups;
  const auto add = [&](size_t entry, const at::Tensor& t) {
    if (t.numel() == 0) {
      return;
    }
    auto group = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == t.device(); });
    if (group == groups.end()) {
      groups.emplace_back(t.device(), std::vector<std::pair<size_t, at::Tensor>>{});
      group = groups.end() - 1;
    }
    group->second.emplace_back(entry, t);
  };
  for (size_t i = 0; i < grams.size(); ++i) {
    add(i, grams[i]);
  }
  for (size_t i = 0; i < matrices.size(); ++i) {
    add(grams.size() + i, matrices[i].reshape({-1}));  // a "diagonal" to gram_stats: its non-finite count is used
  }
  static const auto gram_stats =
      c10::Dispatcher::singleton().findSchemaOrThrow("lorm_ext::gram_stats", "").typed<at::Tensor(at::TensorList)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the op has no autograd formula and needs none here
  std::optional<EntryProblem> first;
  for (const auto& [device, entries] : groups) {
    std::vector<at::Tensor> tensors;
    tensors.reserve(entries.size());
    for (const auto& entry : entries) {
      tensors.push_back(entry.second);
    }
    const at::Tensor stats = gram_stats.call(tensors).cpu();
    const double* row = stats.const_data_ptr<double>();
    for (size_t j = 0; j < entries.size(); ++j) {
      const auto& [entry, t] = entries[j];
      if (first.has_value() && first->entry < entry) {
        break;
      }
      const ValueCheck check = check_value_stats(row + 4 * j, t.scalar_type(), entry < grams.size());
      if (check.problem != ValueProblem::kNone) {
        first = EntryProblem{entry, check};
        break;
      }
    }
  }
  return first;
}

bool is_diagonal_gram(const at::Tensor& gram) {
  return gram.dim() == 1;
}

bool any_overlap(const std::vector<at::Tensor>& tensors) {
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
  for (const auto& t : tensors) {
    if (t.numel() > 0) {
      const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
      ranges.emplace_back(begin, begin + t.nbytes());
    }
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].first < ranges[i - 1].second) {
      return true;
    }
  }
  return false;
}

void check_gram_stats_args(at::TensorList grams) {
  constexpr const char* op = "lorm_ext::gram_stats";
  for (size_t i = 0; i < grams.size(); ++i) {
    check_input(grams[i], op, "grams", i);
    check_gram_shape(grams[i], op, "grams", i);
    TORCH_CHECK(grams[i].numel() > 0, op, ": grams[", i, "] is empty");
  }
  if (!grams.empty()) {
    check_one_device(grams, grams[0], op, "grams");
  }
}

void check_gram_accumulate_args(at::TensorList grams, at::TensorList inputs) {
  constexpr const char* op = "lorm_ext::gram_accumulate_";
  check_lengths(grams.size(), inputs.size(), op, "inputs");
  for (size_t i = 0; i < grams.size(); ++i) {
    const auto& g = grams[i];
    const auto& x = inputs[i];
    check_accumulator(g, op, "grams", i);
    check_gram_shape(g, op, "grams", i);
    check_input(x, op, "inputs", i);
    check_same_device(g, x, op, i);
    TORCH_CHECK(x.dim() >= 1, op, ": inputs[", i, "] must have at least one dimension");
    TORCH_CHECK(x.size(-1) == g.size(0), op, ": inputs[", i, "] has ", x.size(-1), " features but grams[", i,
                "] is for ", g.size(0));
  }
  if (!grams.empty()) {
    check_one_device(grams, grams[0], op, "grams");
  }
  check_inputs_do_not_overlap_outputs({{"inputs", inputs}}, {{"grams", grams}}, op);
}

void check_gram_weighted_accumulate_args(at::TensorList gram_sums, at::TensorList weighted_sums, at::TensorList grams,
                                         at::TensorList factors, at::TensorList lefts) {
  constexpr const char* op = "lorm_ext::gram_weighted_accumulate_";
  const size_t n_layers = gram_sums.size();
  check_lengths(n_layers, weighted_sums.size(), op, "weighted_sums");
  check_lengths(n_layers, grams.size(), op, "grams");
  check_lengths(n_layers, factors.size(), op, "factors");
  TORCH_CHECK(lefts.empty() || lefts.size() == n_layers, op, ": lefts must be empty or have ", n_layers,
              " entries, got ", lefts.size());
  for (size_t i = 0; i < n_layers; ++i) {
    const auto& gs = gram_sums[i];
    const auto& ws = weighted_sums[i];
    const auto& g = grams[i];
    const auto& f = factors[i];
    check_accumulator(gs, op, "gram_sums", i);
    check_accumulator(ws, op, "weighted_sums", i);
    check_gram_shape(gs, op, "gram_sums", i);
    TORCH_CHECK(ws.scalar_type() == gs.scalar_type(), op, ": weighted_sums[", i, "] is ", ws.scalar_type(),
                " but gram_sums[", i, "] is ", gs.scalar_type());
    check_input(g, op, "grams", i);
    check_input(f, op, "factors", i);
    for (const auto* t : {&ws, &g, &f}) {
      check_same_device(gs, *t, op, i);
    }
    TORCH_CHECK(g.sizes() == gs.sizes(), op, ": grams[", i, "] has shape ", g.sizes(), " but gram_sums[", i, "] has ",
                gs.sizes());
    const int64_t n = gs.size(0);
    TORCH_CHECK(f.dim() == 2 && f.size(1) == n, op, ": factors[", i, "] must be (p, ", n, "), got ", f.sizes());
    int64_t rows = f.size(0);
    if (!lefts.empty()) {
      const auto& l = lefts[i];
      check_input(l, op, "lefts", i);
      check_same_device(gs, l, op, i);
      TORCH_CHECK(l.dim() == 2 && l.size(1) == f.size(0), op, ": lefts[", i, "] must be (m, ", f.size(0),
                  ") to multiply factors[", i, "], got ", l.sizes());
      rows = l.size(0);
    }
    TORCH_CHECK(ws.dim() == 2 && ws.size(0) == rows && ws.size(1) == n, op, ": weighted_sums[", i, "] must be (", rows,
                ", ", n, "), got ", ws.sizes());
  }
  if (n_layers > 0) {
    check_one_device(gram_sums, gram_sums[0], op, "gram_sums");
  }
  check_disjoint(gram_sums, weighted_sums, op);
  check_inputs_do_not_overlap_outputs({{"grams", grams}, {"factors", factors}, {"lefts", lefts}},
                                      {{"gram_sums", gram_sums}, {"weighted_sums", weighted_sums}}, op);
}

void check_projected_accumulate_args(at::TensorList projection_sums, at::TensorList weighted_sums, at::TensorList grams,
                                     at::TensorList shared_a, at::TensorList factors_b) {
  constexpr const char* op = "lorm_ext::projected_accumulate_";
  const size_t n_layers = projection_sums.size();
  check_lengths(n_layers, weighted_sums.size(), op, "weighted_sums");
  check_lengths(n_layers, grams.size(), op, "grams");
  check_lengths(n_layers, shared_a.size(), op, "shared_a");
  check_lengths(n_layers, factors_b.size(), op, "factors_b");
  for (size_t i = 0; i < n_layers; ++i) {
    const auto& ps = projection_sums[i];
    const auto& ws = weighted_sums[i];
    const auto& g = grams[i];
    const auto& a = shared_a[i];
    const auto& b = factors_b[i];
    check_accumulator(ps, op, "projection_sums", i);
    check_accumulator(ws, op, "weighted_sums", i);
    TORCH_CHECK(ws.scalar_type() == ps.scalar_type(), op, ": weighted_sums[", i, "] is ", ws.scalar_type(),
                " but projection_sums[", i, "] is ", ps.scalar_type());
    check_input(g, op, "grams", i);
    check_gram_shape(g, op, "grams", i);
    check_input(a, op, "shared_a", i);
    check_input(b, op, "factors_b", i);
    for (const auto* t : {&ws, &g, &a, &b}) {
      check_same_device(ps, *t, op, i);
    }
    const int64_t n = g.size(0);
    TORCH_CHECK(a.dim() == 2 && a.size(1) == n, op, ": shared_a[", i, "] must be (r, ", n, ") for a Gram of width ", n,
                ", got ", a.sizes());
    const int64_t r = a.size(0);
    TORCH_CHECK(b.dim() == 2 && b.size(1) == r, op, ": factors_b[", i, "] must be (m, ", r, ") to match shared_a[", i,
                "], got ", b.sizes());
    TORCH_CHECK(ps.dim() == 2 && ps.size(0) == r && ps.size(1) == r, op, ": projection_sums[", i, "] must be (", r,
                ", ", r, "), got ", ps.sizes());
    TORCH_CHECK(ws.dim() == 2 && ws.size(0) == b.size(0) && ws.size(1) == r, op, ": weighted_sums[", i, "] must be (",
                b.size(0), ", ", r, "), got ", ws.sizes());
  }
  if (n_layers > 0) {
    check_one_device(projection_sums, projection_sums[0], op, "projection_sums");
  }
  check_disjoint(projection_sums, weighted_sums, op);
  check_inputs_do_not_overlap_outputs({{"grams", grams}, {"shared_a", shared_a}, {"factors_b", factors_b}},
                                      {{"projection_sums", projection_sums}, {"weighted_sums", weighted_sums}}, op);
}

}  // namespace lorm_ext
