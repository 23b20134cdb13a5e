"""Every native op against the reference on fresh random inputs, torch.library.opcheck, and bad inputs."""

from __future__ import annotations

import pytest
import torch
from lorm_testing import REL_TOL, assert_rel_close, random_gram, with_nan

from lorm_ext import LayerError, ops
from lorm_ext import reference as ref
from lorm_ext.validation import check_values, symmetry_tolerance

INPUT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
GRAM_DTYPES = [torch.float32, torch.float64]
# Widths and token counts that are not multiples of any tile (tiles are 64/128/256 wide, row chunks 1024).
SHAPES = [(1, 5), (7, 1), (65, 33), (130, 1500), (300, 257)]


def make_input(tokens: int, n: int, dtype, device, layout: str) -> torch.Tensor:
    """(tokens, n) activations in one of several memory layouts."""
    if layout == "contiguous":
        return torch.randn(tokens, n, device=device).to(dtype)
    if layout == "transposed":  # column-major storage
        return torch.randn(n, tokens, device=device).to(dtype).T
    if layout == "strided":  # every other column of a wider buffer
        return torch.randn(tokens, 2 * n, device=device).to(dtype)[:, ::2]
    if layout == "batched":  # (batch, seq, n) as a ViT layer sees it
        return torch.randn(tokens, 1, n, device=device).to(dtype).expand(tokens, 2, n)
    raise ValueError(layout)


def gram_truth(x: torch.Tensor, start: torch.Tensor, diagonal: bool) -> torch.Tensor:
    return ref.gram_ref(x, start.double(), diagonal=diagonal)


@pytest.mark.parametrize("input_dtype", INPUT_DTYPES)
@pytest.mark.parametrize("gram_dtype", GRAM_DTYPES)
@pytest.mark.parametrize("n,tokens", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided", "batched"])
def test_gram_accumulate_matches_reference(device, input_dtype, gram_dtype, n, tokens, layout):
    x = make_input(tokens, n, input_dtype, device, layout)
    for diagonal in (False, True):
        start = random_gram(n, 3, dtype=gram_dtype, device=device, diagonal=diagonal)
        gram = start.clone()
        ops.gram_accumulate_([gram], [x])
        assert gram.dtype == gram_dtype
        assert_rel_close(gram, gram_truth(x, start, diagonal), REL_TOL[gram_dtype])
        if not diagonal:
            assert torch.equal(gram, gram.T), "both triangles must get the same update"


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n", [64, 130, 700])
def test_gram_accumulate_on_any_thread_count(device, threads, n):
    """Narrow Grams split the rows between the threads, wider ones the triangle's tiles: both paths match the
    reference, stay exactly symmetric and give the same bits on every call."""
    x = torch.randn(3000, n, device=device).to(torch.bfloat16)
    start = random_gram(n, 3, dtype=torch.float32, device=device)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        grams = [start.clone(), start.clone()]
        for gram in grams:
            ops.gram_accumulate_([gram], [x])
    finally:
        torch.set_num_threads(before)
    assert_rel_close(grams[0], gram_truth(x, start, False), REL_TOL[torch.float32])
    assert torch.equal(grams[0], grams[0].T)
    assert torch.equal(grams[0], grams[1])


def test_gram_accumulate_many_pairs_in_one_call(device):
    widths = [1, 64, 65, 200]
    xs = [torch.randn(97, w, device=device, dtype=torch.bfloat16) for w in widths]
    grams = [
        torch.zeros(w, device=device) if i % 2 else torch.zeros(w, w, device=device, dtype=torch.float64)
        for i, w in enumerate(widths)
    ]
    starts = [g.clone() for g in grams]
    ops.gram_accumulate_(grams, xs)
    for g, s, x in zip(grams, starts, xs):
        assert_rel_close(g, gram_truth(x, s, g.dim() == 1), REL_TOL[g.dtype])


def test_gram_accumulate_is_as_accurate_as_upcasting_first(device):
    """bf16 products are exact in fp32, so the fused op must match the authors' upcast-then-matmul path."""
    x = torch.randn(3000, 96, device=device).to(torch.bfloat16)
    truth = ref.gram_ref(x, dtype=torch.float64)
    fused = torch.zeros(96, 96, device=device)
    ops.gram_accumulate_([fused], [x])
    authors = x.float().T @ x.float()
    fused_err = (fused.double() - truth).abs().max()
    authors_err = (authors.double() - truth).abs().max()
    assert fused_err <= 2 * authors_err + 1e-6 * truth.abs().max()


def test_gram_accumulate_empty_input_is_a_no_op(device):
    gram = random_gram(5, 7, dtype=torch.float32, device=device)
    before = gram.clone()
    ops.gram_accumulate_([gram], [torch.empty(0, 5, device=device)])
    assert torch.equal(gram, before)


def weighted_truth(gram_sum, weighted_sum, gram, factor, left):
    update = ref.times_gram_ref(factor.double(), gram.double())
    if left is not None:
        update = left.double() @ update
    return gram_sum.double() + gram.double(), weighted_sum.double() + update


@pytest.mark.parametrize("sum_dtype", GRAM_DTYPES)
@pytest.mark.parametrize("input_dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("n,p", [(1, 1), (33, 4), (300, 64), (257, 16), (1100, 8), (520, 136)])
@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("with_left", [False, True])
def test_gram_weighted_accumulate_matches_reference(device, sum_dtype, input_dtype, n, p, diagonal, with_left):
    # On the CPU, n = 1100 is three row chunks whose products are added in order; (520, 136) is read in row
    # chunks with float32 sums and in column panels with float64 ones (its float64 F G does not fit the cache)
    gram = random_gram(n, n + 5, dtype=input_dtype, device=device, diagonal=diagonal)
    factor = torch.randn(p, n, device=device).to(input_dtype)
    left = torch.randn(11, p, device=device).to(input_dtype) if with_left else None
    gram_sum = random_gram(n, 4, dtype=sum_dtype, device=device, diagonal=diagonal)
    weighted_sum = torch.randn(11 if with_left else p, n, device=device, dtype=sum_dtype)
    expected = weighted_truth(gram_sum, weighted_sum, gram, factor, left)
    ops.gram_weighted_accumulate_([gram_sum], [weighted_sum], [gram], [factor], [left] if with_left else None)
    assert_rel_close(gram_sum, expected[0], REL_TOL[sum_dtype])
    assert_rel_close(weighted_sum, expected[1], REL_TOL[sum_dtype])


@pytest.mark.parametrize("sum_dtype", GRAM_DTYPES)
@pytest.mark.parametrize("input_dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("n,r,m", [(1, 1, 1), (40, 1, 9), (20, 2, 7), (50, 8, 300), (300, 16, 70), (129, 64, 3), (1000, 6, 5), (600, 128, 4)])  # fmt: skip
@pytest.mark.parametrize("diagonal", [False, True])
def test_projected_accumulate_matches_reference(device, sum_dtype, input_dtype, n, r, m, diagonal):
    # n = 1000 spans two row chunks (CPU) or several column panels (CUDA), so P is a sum of per-task partials;
    # (600, 128) is read in column panels on the CPU with float64 sums; r = 6 leaves a remainder after the
    # kernels' four-at-a-time dot products; r ∈ {1, 2, 4, 8} take the row kernels (m = 300: several row
    # blocks), the other ranks at::addmm
    gram = random_gram(n, n + 2, dtype=input_dtype, device=device, diagonal=diagonal)
    a, b = torch.randn(r, n, device=device).to(input_dtype), torch.randn(m, r, device=device).to(input_dtype)
    proj_sum = random_gram(r, 3, dtype=sum_dtype, device=device)
    weighted_sum = torch.randn(m, r, device=device, dtype=sum_dtype)
    projection = ref.times_gram_ref(a.double(), gram.double()) @ a.double().T
    expected_proj, expected_weighted = proj_sum.double() + projection, weighted_sum.double() + b.double() @ projection
    ops.projected_accumulate_([proj_sum], [weighted_sum], [gram], [a], [b])
    assert_rel_close(proj_sum, expected_proj, REL_TOL[sum_dtype])
    assert_rel_close(weighted_sum, expected_weighted, REL_TOL[sum_dtype])


def test_ops_take_tensors_that_require_grad(device):
    # activations and factors from a training graph go in as they are (detached inside), with the same result
    x = torch.randn(40, 12, device=device, requires_grad=True)
    a = torch.randn(3, 12, device=device, requires_grad=True)
    b = torch.randn(5, 3, device=device, requires_grad=True)
    gram = random_gram(12, 30, device=device)

    def run(x, a, b):
        gram_sum, weighted_a, projection, weighted_b = (torch.zeros(s, device=device) for s in [(12, 12), (3, 12), (3, 3), (5, 3)])  # fmt: skip
        ops.gram_accumulate_([gram_sum], [x])
        ops.gram_weighted_accumulate_([gram_sum], [weighted_a], [gram], [a])
        ops.projected_accumulate_([projection], [weighted_b], [gram], [a], [b])
        return [gram_sum, weighted_a, projection, weighted_b, ops.gram_stats([gram_sum])]

    with_grad, detached = run(x, a, b), run(x.detach(), a.detach(), b.detach())
    assert all(torch.equal(g, d) for g, d in zip(with_grad, detached))
    assert_rel_close(with_grad[1], a.detach().double() @ gram.double(), 1e-5)


def test_merge_accumulators_batch_many_layers_of_mixed_shapes(device):
    widths, ranks = [8, 300, 8, 65], [2, 16, 1, 4]
    grams = [random_gram(n, n, device=device, diagonal=i == 3) for i, n in enumerate(widths)]
    factors = [torch.randn(r, n, device=device, dtype=torch.float64) for r, n in zip(ranks, widths)]
    sums = [torch.zeros_like(g) for g in grams]
    weighted = [torch.zeros_like(f) for f in factors]
    ops.gram_weighted_accumulate_(sums, weighted, grams, factors)
    for s, w, g, f in zip(sums, weighted, grams, factors):
        assert torch.equal(s, g)
        assert_rel_close(w, ref.times_gram_ref(f, g), 1e-12)


def gram_stats_truth(gram: torch.Tensor) -> list[float]:
    g = gram.double().cpu()
    finite = torch.isfinite(g)
    diag = g if g.dim() == 1 else torch.diagonal(g)
    asymmetry = 0.0 if g.dim() == 1 else (g - g.T)[finite & finite.T].abs().max().item()
    kept = diag[torch.isfinite(diag)]
    return [asymmetry, kept.min().item(), kept.max().item(), float((~finite).sum())]


@pytest.mark.parametrize("dtype", INPUT_DTYPES)
# 136: every pair in the vectorised blocks (a multiple of 8 and 4, over several 64-wide tiles); the others also
# have border columns that the exact pass covers.
@pytest.mark.parametrize("n", [1, 31, 129, 136, 300])
def test_gram_stats_matches_reference(device, dtype, n):
    gram = random_gram(n, n + 3, device=device).to(dtype)
    assert ops.gram_stats([gram])[0].tolist() == [0.0, *gram_stats_truth(gram)[1:3], 0.0]
    broken = gram.clone()
    broken[n // 2, n - 1] += 3  # asymmetric
    broken[n - 1, n - 1] = -1  # negative diagonal
    if n > 1:
        broken[0, n // 3] = float("nan")
        broken[n // 3, n // 3] = float("inf")
    assert ops.gram_stats([]).shape == (0, 4)
    stats, stats_of_diagonal = ops.gram_stats([broken, torch.diagonal(broken).contiguous()]).tolist()
    assert stats == pytest.approx(gram_stats_truth(broken), rel=1e-6)  # |a − b| is taken in float for 32-bit Grams
    assert stats_of_diagonal == pytest.approx(gram_stats_truth(torch.diagonal(broken)), rel=1e-12)


@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_check_values_raises_the_first_problem_in_argument_order(device, dtype):
    """Grams, then matrices, in the order given; empty tensors and tensors that need grad are read as any other;
    a Gram's symmetry is judged with the tolerance of its own dtype."""
    gram = random_gram(12, 15, device=device).to(dtype)
    factor = torch.randn(3, 12, device=device, dtype=dtype, requires_grad=True)
    empty = torch.empty(0, 12, device=device, dtype=dtype)
    check_values({"a": gram, "b": gram}, [("a", "factor", factor), ("b", "factor", empty)])
    negative = gram.clone()
    negative[2, 2] = -1
    with pytest.raises(LayerError, match=r"layer 'b': gram has a negative diagonal entry"):
        check_values({"a": gram, "b": negative, "c": with_nan(gram, 5)}, [("a", "factor", with_nan(factor, 0))])
    with pytest.raises(LayerError, match=r"layer 'c': factor contains NaN or Inf \(2 entries\)"):
        check_values({"a": gram}, [("b", "factor", factor), ("c", "factor", with_nan(with_nan(factor, 1), 7))])
    skewed = gram.clone()
    tolerance = symmetry_tolerance(dtype) * gram.diagonal().max().item()
    skewed[0, 1] += 4 * tolerance  # beyond the dtype's tolerance (and representable: a 16-bit step is below it)
    with pytest.raises(LayerError, match=r"layer 'a': gram is not symmetric \(max \|G - Gᵀ\| = "):
        check_values({"a": skewed}, [])


def test_entries_sharing_an_accumulator_add_up_in_order(device):
    """The same sums in several entries (two clients in one call) must get both updates, with no race."""
    grams = [random_gram(300, 310, dtype=torch.float32, device=device) for _ in range(3)]
    factors = [torch.randn(5, 300, device=device) for _ in range(3)]
    gram_sum, weighted_sum = (
        torch.zeros(300, 300, device=device, dtype=torch.float64),
        torch.zeros(5, 300, device=device, dtype=torch.float64),
    )
    ops.gram_weighted_accumulate_([gram_sum] * 3, [weighted_sum] * 3, grams, factors)
    assert_rel_close(gram_sum, sum(g.double() for g in grams), 1e-12)
    assert_rel_close(weighted_sum, sum(f.double() @ g.double() for f, g in zip(factors, grams)), 1e-12)
    a = torch.randn(4, 300, device=device)
    bs = [torch.randn(600, 4, device=device) for _ in range(3)]  # several row blocks per entry
    proj_sum, weighted = (
        torch.zeros(4, 4, device=device, dtype=torch.float64),
        torch.zeros(600, 4, device=device, dtype=torch.float64),
    )
    ops.projected_accumulate_([proj_sum] * 3, [weighted] * 3, grams, [a] * 3, bs)
    projections = [a.double() @ g.double() @ a.double().T for g in grams]
    assert_rel_close(proj_sum, sum(projections), 1e-12)
    assert_rel_close(weighted, sum(b.double() @ p for b, p in zip(bs, projections)), 1e-12)
    shared = torch.zeros(20, 20, device=device)
    xs = [torch.randn(50, 20, device=device) for _ in range(2)]
    ops.gram_accumulate_([shared, shared], xs)
    assert_rel_close(shared, ref.gram_ref(torch.cat(xs), dtype=torch.float64), REL_TOL[torch.float32])


class TestPsdRightSolve:
    def check(self, rhs, gram, rcond=ref.DEFAULT_RCOND, rel=1e-9):
        out = ops.psd_right_solve(rhs, gram, rcond)
        assert out.dtype == gram.dtype
        expected = torch.stack([ref.right_solve_ref(r, g, rcond) for r, g in zip(rhs.cpu(), gram.cpu())])
        assert_rel_close(out.cpu(), expected, rel)

    def test_positive_definite_batch(self, device):
        grams = torch.stack([random_gram(50, 80, device=device) for _ in range(3)])
        self.check(torch.randn(3, 7, 50, device=device, dtype=torch.float64), grams)

    def test_dead_features_and_few_tokens_use_the_pseudo_inverse(self, device):
        dead = random_gram(40, 60, device=device)
        dead[:, 5] = dead[5, :] = 0  # a feature no token activates
        dead[:, 17] = dead[17, :] = 0
        x = torch.randn(10, 40, dtype=torch.float64, device=device)
        few = torch.zeros(40, 40, dtype=torch.float64, device=device)
        few[:20, :20] = x[:, :20].T @ x[:, :20]  # exactly rank 10 on 20 live features
        grams = torch.stack([dead, few, random_gram(40, 50, device=device)])
        # Rows in the Grams' range, as every merge numerator Σ F_k G_k is: the answer is then well defined.
        rhs = torch.randn(3, 6, 40, dtype=torch.float64, device=device) @ grams
        self.check(rhs, grams)

    def test_zero_gram_gives_zero(self, device):
        out = ops.psd_right_solve(torch.randn(1, 3, 4, device=device), torch.zeros(1, 4, 4, device=device))
        assert torch.equal(out, torch.zeros_like(out))

    def test_diagonal_with_zero_entries(self, device):
        gram = torch.rand(2, 30, dtype=torch.float64, device=device) + 0.1
        gram[0, [1, 4]] = 0
        self.check(torch.randn(2, 5, 30, dtype=torch.float64, device=device), gram, rel=1e-14)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    @pytest.mark.parametrize("rcond", [0.0, ref.DEFAULT_RCOND, 0.3])
    def test_diagonal_is_the_cut_reciprocal_exactly(self, device, dtype, rcond):
        """Every device computes rhs · (|g| > rcond · max |g| ? 1 / g : 0), the same bits as these torch ops."""
        gram = torch.rand(2, 3, 40, dtype=dtype, device=device)
        gram[0, 1, [2, 9]] = 0
        gram[1, 0, :4] = 1e-30
        rhs = torch.randn(2, 3, 5, 40, dtype=dtype, device=device)
        magnitude = gram.abs()
        keep = magnitude > rcond * magnitude.amax(-1, keepdim=True)
        expected = rhs * torch.where(keep, gram.reciprocal(), torch.zeros_like(gram)).unsqueeze(-2)
        assert torch.equal(ops.psd_right_solve(rhs, gram, rcond), expected)

    def test_float32_gram(self, device):
        gram = random_gram(20, 40, dtype=torch.float32, device=device)[None]
        self.check(torch.randn(1, 3, 20, device=device), gram, rel=1e-3)

    def test_unbatched(self, device):
        gram = random_gram(9, 20, device=device)
        rhs = torch.randn(4, 9, dtype=torch.float64, device=device)
        assert_rel_close(ops.psd_right_solve(rhs, gram).cpu(), ref.right_solve_ref(rhs.cpu(), gram.cpu()), 1e-10)


def opcheck_samples(device):
    x = torch.randn(33, 20, device=device, dtype=torch.bfloat16)
    g = random_gram(20, 30, dtype=torch.float32, device=device)
    f = torch.randn(4, 20, device=device)
    return {
        "gram_accumulate_": [([torch.zeros(20, 20, device=device), torch.zeros(20, device=device)], [x, x])],
        "gram_weighted_accumulate_": [
            ([torch.zeros(20, 20, device=device)], [torch.zeros(4, 20, device=device)], [g], [f], []),
            (
                [torch.zeros(20, 20, device=device)],
                [torch.zeros(6, 20, device=device)],
                [g],
                [f],
                [torch.randn(6, 4, device=device)],
            ),
        ],
        "projected_accumulate_": [
            (
                [torch.zeros(4, 4, device=device)],
                [torch.zeros(9, 4, device=device)],
                [g],
                [f],
                [torch.randn(9, 4, device=device)],
            )
        ],
        "psd_right_solve": [(torch.randn(2, 3, 20, device=device), torch.stack([g, g]).double(), 1e-15)],
        "gram_stats": [([g, torch.diagonal(g).contiguous(), g[:7, :7].contiguous()],)],
    }


@pytest.mark.parametrize(
    "name", ["gram_accumulate_", "gram_weighted_accumulate_", "projected_accumulate_", "gram_stats", "psd_right_solve"]
)
def test_opcheck(device, name):
    op = getattr(torch.ops.lorm_ext, name).default
    for args in opcheck_samples(device)[name]:
        torch.library.opcheck(op, args)


class TestBadInputs:
    """The ops' own checks (C++ callers see these); each names the op and the entry, and changes nothing."""

    def expect_error(self, fn, accumulators, *fragments):
        before = [a.clone() for a in accumulators]
        with pytest.raises(RuntimeError) as info:
            fn()
        for fragment in fragments:
            assert fragment in str(info.value), str(info.value)
        for a, b in zip(accumulators, before):
            assert torch.equal(a, b), "a rejected call must leave the accumulators unchanged"

    def test_gram_accumulate(self, device):
        good, other = torch.zeros(4, 4, device=device), torch.zeros(3, 3, device=device)
        x = torch.randn(5, 4, device=device)
        call = lambda grams, xs: lambda: ops.gram_accumulate_(grams, xs)  # noqa: E731
        self.expect_error(call([good], [x, x]), [good], "inputs has 2 entries, expected 1")
        self.expect_error(call([good, other], [x, x]), [good, other], "inputs[1] has 4 features but grams[1] is for 3")
        self.expect_error(call([torch.zeros(4, 3, device=device)], [x]), [], "grams[0] must be a square")
        self.expect_error(call([good.long()], [x]), [], "grams[0] must be float32 or float64")
        self.expect_error(call([good], [x.long()]), [good], "inputs[0] must be float16, bfloat16")
        self.expect_error(call([torch.zeros(4, 8, device=device)[:, ::2]], [x]), [], "must be contiguous")

    def test_gram_weighted_accumulate(self, device):
        s, w = torch.zeros(4, 4, device=device), torch.zeros(2, 4, device=device)
        g, f = random_gram(4, 6, dtype=torch.float32, device=device), torch.randn(2, 4, device=device)
        call = lambda *a: lambda: ops.gram_weighted_accumulate_(*a)  # noqa: E731
        self.expect_error(
            call([s], [w], [g[:3, :3]], [f]), [s, w], "grams[0] has shape [3, 3] but gram_sums[0] has [4, 4]"
        )
        self.expect_error(call([s], [w], [g], [torch.randn(2, 5, device=device)]), [s, w], "factors[0] must be (p, 4)")
        self.expect_error(
            call([s], [w.double()], [g], [f]), [s, w], "weighted_sums[0] is Double but gram_sums[0] is Float"
        )
        self.expect_error(
            call([s], [w], [g], [f], [torch.randn(3, 3, device=device)]), [s, w], "lefts[0] must be (m, 2)"
        )
        self.expect_error(
            call([s], [torch.zeros(3, 4, device=device)], [g], [f]), [s], "weighted_sums[0] must be (2, 4)"
        )

    def test_accumulators_of_one_entry_must_not_overlap(self, device):
        s = torch.zeros(4, 4, device=device)
        g, f = random_gram(4, 6, dtype=torch.float32, device=device), torch.randn(4, 4, device=device)
        self.expect_error(
            lambda: ops.gram_weighted_accumulate_([s], [s], [g], [f]), [s], "the accumulators of entry 0 share memory"
        )
        p = torch.zeros(4, 4, device=device)
        self.expect_error(
            lambda: ops.projected_accumulate_([p], [p], [g], [f], [f]), [p], "the accumulators of entry 0 share memory"
        )

    def test_projected_accumulate(self, device):
        p, w = torch.zeros(2, 2, device=device), torch.zeros(5, 2, device=device)
        g, a, b = (
            random_gram(4, 6, dtype=torch.float32, device=device),
            torch.randn(2, 4, device=device),
            torch.randn(5, 2, device=device),
        )
        call = lambda *args: lambda: ops.projected_accumulate_(*args)  # noqa: E731
        self.expect_error(
            call([p], [w], [g], [torch.randn(2, 3, device=device)], [b]), [p, w], "shared_a[0] must be (r, 4)"
        )
        self.expect_error(
            call([p], [w], [g], [a], [torch.randn(5, 3, device=device)]), [p, w], "factors_b[0] must be (m, 2)"
        )
        self.expect_error(
            call([torch.zeros(3, 3, device=device)], [w], [g], [a], [b]), [w], "projection_sums[0] must be (2, 2)"
        )

    def test_gram_stats(self, device):
        call = lambda *g: lambda: ops.gram_stats(g)  # noqa: E731
        ok = torch.eye(3, device=device)
        self.expect_error(call(ok, torch.zeros(0, 0, device=device)), [], "lorm_ext::gram_stats: grams[1] is empty")
        self.expect_error(call(torch.zeros(3, 4, device=device)), [], "grams[0] must be a square")
        self.expect_error(call(ok, torch.zeros(3, 3, dtype=torch.long, device=device)), [], "grams[1] must be float16")

    def test_psd_right_solve(self, device):
        g = random_gram(4, 6, device=device)
        call = lambda *a: lambda: ops.psd_right_solve(*a)  # noqa: E731
        self.expect_error(call(torch.randn(3, 5, device=device), g), [], "rhs has 5 columns but gram is for 4")
        self.expect_error(call(torch.randn(3, 4, device=device), g.long()), [], "gram must be float32 or float64")
        self.expect_error(call(torch.randn(2, 3, 4, device=device), torch.stack([g, g, g])), [], "batch dims differ")


def test_ops_trace_under_torch_compile(device):
    """The fake kernels let dynamo trace the ops into one graph (no graph break)."""

    def step(gram, x, rhs):
        ops.gram_accumulate_([gram], [x])
        return ops.psd_right_solve(rhs, gram.double()[None])

    gram = torch.eye(12, device=device)
    x = torch.randn(40, 12, device=device)
    rhs = torch.randn(1, 3, 12, device=device, dtype=torch.float64)
    expected = ops.psd_right_solve(rhs, (gram + ref.gram_ref(x)).double()[None])
    out = torch.compile(step, backend="aot_eager", fullgraph=True)(gram, x, rhs)
    assert_rel_close(out, expected, 1e-9)
    assert_rel_close(gram, torch.eye(12, device=device) + ref.gram_ref(x), REL_TOL[torch.float32])


class TestInputsMustNotOverlapOutputs:
    """An input that is (part of) an output would be read half-updated: every such call is refused, by name."""

    def expect_overlap(self, fn, accumulators, fragment):
        TestBadInputs().expect_error(fn, accumulators, fragment, "shares memory with")

    def test_gram_accumulate(self, device):
        g = random_gram(6, 9, dtype=torch.float32, device=device)
        self.expect_overlap(lambda: ops.gram_accumulate_([g], [g]), [g], "inputs[0] shares memory with grams[0]")
        other = torch.zeros(6, 6, device=device)
        self.expect_overlap(
            lambda: ops.gram_accumulate_([other, g], [torch.randn(3, 6, device=device), g[:2]]),
            [g, other],
            "inputs[1] shares memory with grams[1]",
        )
        self.expect_overlap(
            lambda: ops.gram_accumulate_([g, other], [torch.randn(3, 6, device=device), g]),
            [g, other],
            "inputs[1] shares memory with grams[0]",
        )

    def test_gram_weighted_accumulate(self, device):
        n = 6
        gram = random_gram(n, 9, dtype=torch.float32, device=device)
        gram_sum, weighted = torch.zeros(n, n, device=device), torch.zeros(n, n, device=device)
        call = lambda *a: lambda: ops.gram_weighted_accumulate_(*a)  # noqa: E731
        acc = [gram_sum, weighted]
        self.expect_overlap(
            call([gram_sum], [weighted], [gram], [weighted]), acc, "factors[0] shares memory with weighted_sums[0]"
        )
        self.expect_overlap(
            call([gram_sum], [weighted], [gram], [gram_sum]), acc, "factors[0] shares memory with gram_sums[0]"
        )
        self.expect_overlap(
            call([gram_sum], [weighted], [gram_sum.T], [gram]), acc, "grams[0] shares memory with gram_sums[0]"
        )
        left = torch.zeros(n, n, device=device)
        self.expect_overlap(
            call([gram_sum], [left], [gram], [gram.clone()], [left]),
            [gram_sum, left],
            "lefts[0] shares memory with weighted_sums[0]",
        )

    @pytest.mark.parametrize("r", [3, 16])
    def test_projected_accumulate(self, device, r):
        n, m = 20, 16
        gram = random_gram(n, 30, dtype=torch.float32, device=device)
        a, b = torch.randn(r, n, device=device), torch.randn(m, r, device=device)
        proj, weighted = torch.zeros(r, r, device=device), torch.zeros(m, r, device=device)
        call = lambda *args: lambda: ops.projected_accumulate_(*args)  # noqa: E731
        self.expect_overlap(
            call([proj], [weighted], [gram], [a], [weighted]),
            [proj, weighted],
            "factors_b[0] shares memory with weighted_sums[0]",
        )
        buffer = torch.zeros(r * n + r * r, device=device)  # A and ΣP carved out of one buffer, overlapping
        shared_a, proj_view = buffer[: r * n].view(r, n), buffer[r * n - r * r : r * n].view(r, r)
        self.expect_overlap(
            call([proj_view], [weighted], [gram], [shared_a], [b]),
            [proj_view, weighted],
            "shared_a[0] shares memory with projection_sums[0]",
        )

    def test_disjoint_views_of_one_buffer_are_accepted(self, device):
        buffer = torch.zeros(2, 5, 5, device=device)
        x = torch.randn(7, 5, device=device)
        ops.gram_accumulate_([buffer[0]], [x])
        assert_rel_close(buffer[0], ref.gram_ref(x, dtype=torch.float64), REL_TOL[torch.float32])


class TestSolveArguments:
    def test_rcond_is_honoured_on_every_path(self, device):
        """The Cholesky fast path would keep the 1e-8 direction; pinverse semantics at rcond 1e-6 drop it."""
        gram = torch.diag(torch.tensor([1.0, 1e-8], dtype=torch.float64, device=device))
        rhs = torch.ones(1, 2, dtype=torch.float64, device=device)
        for g in (gram, torch.diagonal(gram)[None]):
            out = ops.psd_right_solve(rhs, g, 1e-6)
            assert torch.equal(out.cpu(), torch.tensor([[1.0, 0.0]], dtype=torch.float64)), out
        assert ops.psd_right_solve(rhs, gram, 1e-9).cpu()[0, 1] == pytest.approx(1e8)

    @pytest.mark.parametrize("rcond", [1e-15, 1e-10, 1e-6, 1e-3])
    def test_non_default_rcond_matches_the_reference(self, device, rcond):
        q = torch.linalg.qr(torch.randn(30, 30, dtype=torch.float64)).Q
        spectrum = torch.logspace(0, -8, 30, dtype=torch.float64)  # eigenvalues on both sides of every cut but 1e-15
        gram = ((q * spectrum) @ q.T).to(device)
        gram = (gram + gram.T) / 2
        rhs = torch.randn(4, 30, dtype=torch.float64, device=device) @ gram
        expected = ref.right_solve_ref(rhs.cpu(), gram.cpu(), rcond)
        assert_rel_close(ops.psd_right_solve(rhs, gram, rcond).cpu(), expected, 1e-6)
        diagonal = spectrum.to(device)
        assert_rel_close(
            ops.psd_right_solve(rhs, diagonal[None, :], rcond).cpu(),
            ref.right_solve_ref(rhs.cpu(), diagonal.cpu(), rcond),
            1e-12,
        )

    def test_diagonal_as_a_row_equals_the_vector_form(self, device):
        grams = torch.rand(3, 3, dtype=torch.float64, device=device) + 0.1  # 3 diagonal Grams of width 3
        rhs = torch.randn(3, 2, 3, dtype=torch.float64, device=device)
        expected = torch.stack([ref.right_solve_ref(r, g) for r, g in zip(rhs.cpu(), grams.cpu())])
        assert_rel_close(ops.psd_right_solve(rhs, grams[:, None, :]).cpu(), expected, 1e-14)

    def test_bad_arguments_are_clear_errors(self, device):
        g = random_gram(4, 6, device=device)
        rhs = torch.randn(3, 4, dtype=torch.float64, device=device)
        call = lambda *a: lambda: ops.psd_right_solve(*a)  # noqa: E731
        bad = TestBadInputs().expect_error
        for rcond in (-1e-15, float("nan"), float("inf")):
            bad(call(rhs, g, rcond), [], "rcond must be finite and >= 0")
        bad(call(torch.randn(4, 3, 4, dtype=torch.float64, device=device), g), [], "is ambiguous", "(..., 1, n)")
        asymmetric = g.clone()
        asymmetric[0, 3] += 1
        bad(call(rhs, asymmetric), [], "gram 0 is not symmetric")
        bad(call(rhs, torch.full_like(g, float("nan"))), [], "gram 0 contains NaN or Inf")


def test_meta_tensors_mixed_with_real_ones_are_refused(device):
    """The dispatcher sends a call with any meta tensor to the fake kernel: with real tensors among them that
    would silently do nothing."""
    g, x = torch.zeros(4, 4, device=device), torch.randn(3, 4, device=device)
    meta = torch.zeros(4, 4, device="meta")
    with pytest.raises(RuntimeError, match="lorm_ext::gram_accumulate_: tensors on several devices"):
        ops.gram_accumulate_([g, meta], [x, x.to("meta")])
    f = torch.randn(2, 4, device=device)
    with pytest.raises(RuntimeError, match="lorm_ext::gram_weighted_accumulate_: tensors on several devices"):
        ops.gram_weighted_accumulate_([meta], [torch.zeros(2, 4, device=device)], [g], [f])
    with pytest.raises(RuntimeError, match="lorm_ext::projected_accumulate_: tensors on several devices"):
        ops.projected_accumulate_(
            [torch.zeros(2, 2, device="meta")],
            [torch.zeros(5, 2, device=device)],
            [g],
            [f],
            [torch.randn(5, 2, device=device)],
        )
    with pytest.raises(RuntimeError, match="lorm_ext::psd_right_solve: tensors on several devices"):
        ops.psd_right_solve(torch.randn(2, 4, device="meta"), g.double())
    with pytest.raises(RuntimeError, match="lorm_ext::gram_stats: tensors on several devices"):
        ops.gram_stats([g, meta])
    assert torch.equal(g, torch.zeros(4, 4, device=device))


def test_bad_shapes_are_reported_while_tracing(device):
    """The fake kernels check shapes, so torch.compile names the op and the problem at trace time."""
    gram = torch.zeros(6, 6, device=device)

    def accumulate(g, x):
        ops.gram_accumulate_([g], [x])
        return g

    with pytest.raises(
        Exception, match=r"lorm_ext::gram_accumulate_: inputs\[0\] has 5 features but grams\[0\] is for 6"
    ):
        torch.compile(accumulate, backend="aot_eager", fullgraph=True)(gram, torch.randn(3, 5, device=device))

    def weighted(s, w, g, f):
        ops.gram_weighted_accumulate_([s], [w], [g], [f])
        return s

    with pytest.raises(Exception, match=r"factors\[0\] must be \(p, 6\)"):
        torch.compile(weighted, backend="aot_eager", fullgraph=True)(
            gram, torch.zeros(2, 6, device=device), gram.clone(), torch.randn(2, 5, device=device)
        )
    assert torch.equal(gram, torch.zeros(6, 6, device=device))
