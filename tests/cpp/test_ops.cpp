// C++ test of the lorm_ext libtorch library: calls every op through the public header <lorm_ext/ops.h>, the
// way a C++ user would, and compares them with plain ATen computations. Prints every check; exits non-zero if any
// failed. Runs on CPU, and also on CUDA when the library has its CUDA implementations and a GPU is present.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <lorm_ext/ops.h>

#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

namespace {

int failures = 0;

// max |actual − expected| <= atol + rtol·max|expected|: one scale for the whole tensor, since Gram entries
// and solutions mix large and near-zero values.
void expect_close(const std::string& name, const at::Tensor& actual, const at::Tensor& expected, double rtol,
                  double atol) {
  const at::Tensor a = actual.cpu().to(at::kDouble);
  const at::Tensor e = expected.cpu().to(at::kDouble);
  if (a.sizes() != e.sizes()) {
    std::cerr << "FAIL " << name << ": shape " << a.sizes() << ", expected " << e.sizes() << "\n";
    ++failures;
    return;
  }
  const double error = (a - e).abs().max().item<double>();
  const double tolerance = atol + rtol * e.abs().max().item<double>();
  const bool ok = error <= tolerance;  // false for NaN too
  std::cout << (ok ? "ok   " : "FAIL ") << name << ": max abs error " << error << " (tolerance " << tolerance << ")\n";
  failures += ok ? 0 : 1;
}

using lorm_ext::gram_accumulate_;
using lorm_ext::gram_stats;
using lorm_ext::gram_weighted_accumulate_;
using lorm_ext::projected_accumulate_;
using lorm_ext::psd_right_solve;

at::Tensor flat_float(const at::Tensor& x, int64_t n) {
  return x.reshape({-1, n}).to(at::kFloat);
}

// Three (G, X) pairs in one call, each G starting non-zero so that "+=" is checked, not "=":
// bf16 X into a full fp32 G (1200 rows: more than one upcast chunk; n = 70: no whole tiles),
// bf16 X into a diagonal fp32 G, and a non-contiguous fp32 X into a full fp64 G.
void test_gram_accumulate(const at::Device device) {
  const std::string where = " [" + device.str() + "]";
  const int64_t n = 70;
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(device);
  const at::Tensor x_full = at::randn({3, 400, n}, f32).to(at::kBFloat16);
  const at::Tensor x_diag = at::randn({257, n}, f32).to(at::kBFloat16);
  const at::Tensor x_strided = at::randn({n, 150}, f32).t();  // (150, n), column-major
  const at::Tensor g0_full = at::randn({n, n}, f32);
  const at::Tensor g0_diag = at::rand({n}, f32);
  const at::Tensor g0_double = at::randn({n, n}, f32.dtype(at::kDouble));

  std::vector<at::Tensor> grams = {g0_full.clone(), g0_diag.clone(), g0_double.clone()};
  gram_accumulate_(grams, {x_full, x_diag, x_strided});

  const at::Tensor xf = flat_float(x_full, n);
  const at::Tensor xd = flat_float(x_diag, n);
  const at::Tensor xs = x_strided.to(at::kDouble);
  // bf16 products are exact in fp32; only the summation order differs from the reference.
  expect_close("gram_accumulate_ full, bf16 -> fp32" + where, grams[0], g0_full + xf.t().mm(xf), 1e-5, 1e-5);
  expect_close("gram_accumulate_ diagonal, bf16 -> fp32" + where, grams[1], g0_diag + xd.square().sum(0), 1e-5, 1e-5);
  expect_close("gram_accumulate_ full, strided fp32 -> fp64" + where, grams[2], g0_double + xs.t().mm(xs), 1e-12, 0);
}

// The merge sums against ATen in float64: RegMean / A-step with and without lefts, and the B-step's projection.
void test_merge_sums(const at::Device device) {
  const std::string where = " [" + device.str() + "]";
  const int64_t n = 50, r = 4, out = 30;
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(device);
  const auto f64 = f32.dtype(at::kDouble);
  const at::Tensor x = at::randn({80, n}, f32);
  const at::Tensor gram = x.t().mm(x);
  const at::Tensor a = at::randn({r, n}, f32), b = at::randn({out, r}, f32);
  const at::Tensor g = gram.to(at::kDouble), a64 = a.to(at::kDouble), b64 = b.to(at::kDouble);

  at::Tensor gram_sum = at::ones({n, n}, f64), weighted = at::ones({r, n}, f64),
             left_weighted = at::ones({out, n}, f64);
  at::Tensor second_sum = at::ones({n, n}, f64);
  gram_weighted_accumulate_({gram_sum}, {weighted}, {gram}, {a});
  gram_weighted_accumulate_({second_sum}, {left_weighted}, {gram}, {a}, {b});
  expect_close("gram_weighted_accumulate_ gram sum" + where, gram_sum, 1 + g, 1e-12, 0);
  expect_close("gram_weighted_accumulate_ F G" + where, weighted, 1 + a64.mm(g), 1e-12, 0);
  expect_close("gram_weighted_accumulate_ L F G" + where, left_weighted, 1 + b64.mm(a64.mm(g)), 1e-12, 0);

  at::Tensor projection_sum = at::ones({r, r}, f64), projected = at::ones({out, r}, f64);
  projected_accumulate_({projection_sum}, {projected}, {gram}, {a}, {b});
  const at::Tensor p = a64.mm(g).mm(a64.t());
  expect_close("projected_accumulate_ A G Aᵀ" + where, projection_sum, 1 + p, 1e-12, 0);
  expect_close("projected_accumulate_ B P" + where, projected, 1 + b64.mm(p), 1e-12, 0);
}

// gram_stats: asymmetry, diagonal range and non-finite count, of a full and a diagonal Gram in one call.
void test_gram_stats(const at::Device device) {
  const std::string where = " [" + device.str() + "]";
  const auto f64 = at::TensorOptions().dtype(at::kDouble).device(device);
  at::Tensor gram = at::eye(20, f64).mul_(2);
  gram.index_put_({3, 7}, 0.5);
  gram.index_put_({5, 5}, -1.0);
  const at::Tensor diagonal = at::full({9}, 3.0, f64).index_fill_(0, at::tensor({4}, f64.dtype(at::kLong)), NAN);
  const at::Tensor stats = gram_stats({gram, diagonal});
  const at::Tensor expected = at::tensor({0.5, -1.0, 2.0, 0.0, 0.0, 3.0, 3.0, 1.0}, f64).view({2, 4});
  expect_close("gram_stats" + where, stats, expected, 0, 0);
}

// rhs @ pinv(G) for a batch of one well-conditioned SPD Gram and one of rank 5 (the eigendecomposition
// fallback), and for a diagonal Gram with zero entries (dead features).
void test_psd_right_solve(const at::Device device) {
  const std::string where = " [" + device.str() + "]";
  const int64_t n = 40, m = 7, rank = 5;
  const double rcond = 1e-10;
  const auto f64 = at::TensorOptions().dtype(at::kDouble).device(device);

  const at::Tensor a = at::randn({n, n}, f64);
  const at::Tensor spd = a.mm(a.t()) + n * at::eye(n, f64);
  const at::Tensor b = at::randn({n, rank}, f64);
  const at::Tensor singular = b.mm(b.t());
  const at::Tensor grams = at::stack({spd, singular});
  const at::Tensor rhs = at::randn({2, m, n}, f64);

  const at::Tensor out = psd_right_solve(rhs, grams, rcond);
  expect_close("psd_right_solve SPD" + where, out[0], rhs[0].mm(at::linalg_pinv(spd, rcond, /*hermitian=*/true)), 1e-10,
               0);
  expect_close("psd_right_solve singular (rank 5)" + where, out[1],
               rhs[1].mm(at::linalg_pinv(singular, rcond, /*hermitian=*/true)), 1e-8, 0);

  const at::Tensor dead = at::arange(0, n, 3, f64.dtype(at::kLong));
  const at::Tensor diagonal = at::rand({n}, f64).add_(0.5).index_fill_(0, dead, 0.0);
  expect_close("psd_right_solve diagonal with zeros" + where, psd_right_solve(rhs[0], diagonal, rcond),
               rhs[0].mm(at::linalg_pinv(at::diag(diagonal), rcond, /*hermitian=*/true)), 1e-12, 0);
}

// The C++ safety net rejects bad shapes with an error naming the op.
void test_bad_input(const at::Device device) {
  const std::string name = "psd_right_solve rejects a non-square gram [" + device.str() + "]";
  const auto f64 = at::TensorOptions().dtype(at::kDouble).device(device);
  try {
    psd_right_solve(at::ones({3, 4}, f64), at::ones({4, 5}, f64), 1e-10);
  } catch (const c10::Error& e) {
    const bool named = std::string(e.what()).find("lorm_ext::psd_right_solve") != std::string::npos;
    std::cout << (named ? "ok   " : "FAIL ") << name << (named ? "\n" : ": message does not name the op\n");
    failures += named ? 0 : 1;
    return;
  }
  std::cerr << "FAIL " << name << ": no error raised\n";
  ++failures;
}

}  // namespace

int main() {
  std::vector<at::Device> devices = {at::kCPU};
#ifdef LORM_EXT_WITH_CUDA
  if (at::hasCUDA()) {
    devices.emplace_back(at::kCUDA);
  }
#endif
  try {
    for (const auto& device : devices) {
      at::manual_seed(0);
      test_gram_accumulate(device);
      test_merge_sums(device);
      test_gram_stats(device);
      test_psd_right_solve(device);
      test_bad_input(device);
    }
  } catch (const std::exception& e) {
    std::cerr << "FAIL: unexpected exception: " << e.what() << "\n";
    return EXIT_FAILURE;
  }
  if (failures > 0) {
    std::cerr << failures << " check(s) failed\n";
    return EXIT_FAILURE;
  }
  std::cout << "all checks passed\n";
  return EXIT_SUCCESS;
}
