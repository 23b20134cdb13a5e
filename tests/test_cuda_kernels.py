"""GPU-only checks of the CUDA implementations (csrc/cuda/), beyond the device-parametrized op tests.

They target what the custom kernels do differently from a plain matmul: the tensor-core path for 16-bit
inputs and its accuracy against the upcast-then-fp32 reference, grouped launches of many pairs of mixed widths
(and more pairs than one launch holds), row splits reduced in a fixed order, strided inputs, diagonal Grams,
float64 accumulators, the merge passes for ranks that span several 16-row chunks, and streaming equal to
batch. Everything is compared with float64 computed from the same inputs.

These tests run the implementation LORM_EXT_CUDA_KERNELS selects (bench/gpu_check.sh runs the file under
both); the last section runs both in one process and compares them with each other and with float64, and
captures every op in a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch
from lorm_testing import REL_TOL, layer_inputs, random_gram, rel_err

from lorm_ext import ops
from lorm_ext.reference import gram_ref

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and ops.compiled_with_cuda()),
    reason="needs a GPU and a CUDA build of lorm_ext",
)

DEVICE = "cuda"


def exact_gram(x: torch.Tensor, acc_dtype: torch.dtype, diagonal: bool = False) -> torch.Tensor:
    """XᵀX in float64 from X rounded to the accumulator dtype (what the op's upcast produces)."""
    xs = x.reshape(-1, x.shape[-1]).to(acc_dtype).double()
    return (xs * xs).sum(0) if diagonal else xs.T @ xs


def activations(rows: int, n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Layer-input-like data on the GPU, the same for a given seed."""
    return layer_inputs(rows, n, dtype=dtype, device=DEVICE, seed=seed)


# ------------------------------------------------------------------------------------------ Gram


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 7, 64, 65, 130, 768])
@pytest.mark.parametrize("rows", [1, 31, 33, 3152])
def test_tensor_core_gram_matches_float64(dtype, n, rows):
    x = activations(rows, n, dtype)
    g = torch.zeros(n, n, device=DEVICE)
    ops.gram_accumulate_([g], [x])
    assert rel_err(g, exact_gram(x, torch.float32)) < REL_TOL[torch.float32]
    assert rel_err(g.T, g.double()) < 1e-6  # off-diagonal tiles are mirrored; diagonal ones computed whole


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [768, 3072])
def test_tensor_core_gram_no_less_accurate_than_upcast_reference(dtype, n):
    """The issue's bar: bf16/fp16 on tensor cores as accurate as upcasting to fp32 and calling matmul."""
    x = activations(3152, n, dtype, seed=1)
    exact = exact_gram(x, torch.float32)
    ours = torch.zeros(n, n, device=DEVICE)
    ops.gram_accumulate_([ours], [x])
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        reference = gram_ref(x, torch.zeros(n, n, device=DEVICE))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    ours_err = torch.linalg.norm(ours.double() - exact).item()
    ref_err = torch.linalg.norm(reference.double() - exact).item()
    # Both errors are sums of fp32 roundings; "no worse" up to 10% of the reference's own error.
    assert ours_err <= 1.1 * ref_err + 1e-12 * torch.linalg.norm(exact).item(), (ours_err, ref_err)


def test_fp32_input_is_exact_fma_not_tf32():
    """fp32 X takes the FMA path: error at fp32 rounding level, well below TF32's (about 2^-11)."""
    x = activations(2000, 300, torch.float32)
    g = torch.zeros(300, 300, device=DEVICE)
    ops.gram_accumulate_([g], [x])
    assert rel_err(g, exact_gram(x, torch.float32)) < REL_TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_float64_gram(dtype):
    x = activations(1000, 97, dtype)
    g = torch.randn(97, 97, device=DEVICE, dtype=torch.float64)
    g = g + g.T
    expected = g + exact_gram(x, torch.float64)
    ops.gram_accumulate_([g], [x])
    assert rel_err(g, expected) < REL_TOL[torch.float64]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 7, 33, 768])
def test_diagonal_gram(dtype, acc_dtype, n):
    x = activations(3152, n, dtype)
    g = torch.rand(n, device=DEVICE, dtype=acc_dtype)
    expected = g.double() + exact_gram(x, acc_dtype, diagonal=True)
    ops.gram_accumulate_([g], [x])
    assert rel_err(g, expected) < REL_TOL[acc_dtype]


def test_many_pairs_of_mixed_widths_in_one_call():
    widths = [1, 7, 64, 65, 768, 3000, 128, 129, 2]
    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    xs, grams, expected = [], [], []
    for i, n in enumerate(widths):
        for j, dtype in enumerate(dtypes):
            x = activations(100 + 37 * i, n, dtype, seed=10 * i + j)
            diagonal = (i + j) % 4 == 0
            acc = torch.float64 if (i + j) % 3 == 0 else torch.float32
            g = torch.zeros((n,) if diagonal else (n, n), device=DEVICE, dtype=acc)
            xs.append(x)
            grams.append(g)
            expected.append(exact_gram(x, acc, diagonal))
    ops.gram_accumulate_(grams, xs)
    for g, e in zip(grams, expected):
        assert rel_err(g, e) < REL_TOL[g.dtype], (tuple(g.shape), g.dtype)


def test_more_pairs_than_one_launch_holds():
    """Lists longer than the 128 descriptors of one launch are split over several launches."""
    xs = [activations(40, 3 + i % 50, torch.bfloat16, seed=i) for i in range(300)]
    grams = [torch.zeros(x.shape[1], x.shape[1], device=DEVICE) for x in xs]
    ops.gram_accumulate_(grams, xs)
    for g, x in zip(grams, xs):
        assert rel_err(g, exact_gram(x, torch.float32)) < REL_TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_row_splits_and_repeated_gram(dtype):
    """Few tiles and many rows: tiles are split over rows (workspace slots, then the split reduction); the
    same Gram twice in one call: the two entries run one after the other."""
    x1 = activations(20000, 40, dtype, seed=1)
    x2 = activations(7000, 40, dtype, seed=2)
    g = torch.zeros(40, 40, device=DEVICE)
    ops.gram_accumulate_([g, g], [x1, x2])
    assert rel_err(g, exact_gram(x1, torch.float32) + exact_gram(x2, torch.float32)) < REL_TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_strided_and_batched_inputs(dtype):
    base = activations(3 * 170, 2 * 131, dtype).reshape(3, 170, 2 * 131)
    cases = [
        base[..., ::2],  # column stride 2: element-wise loads
        base.reshape(510, 262).T.contiguous().T[:, 5:136],  # column-major view, unaligned start
        base[:, :, 1:132],  # offset by one element: not 16-byte aligned
        base.transpose(0, 1)[:, :, :131],  # 3-D, not viewable as 2-D: reshaped copy in X's dtype
    ]
    for x in cases:
        n = x.shape[-1]
        g = torch.zeros(n, n, device=DEVICE)
        ops.gram_accumulate_([g], [x])
        assert rel_err(g, exact_gram(x, torch.float32)) < REL_TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("n", [40, 768, 3072])
def test_gram_is_bitwise_reproducible(dtype, n):
    """With row splits (40, 768 wide: few tiles) and without (3072): no atomics, a fixed order of adds."""
    x = activations(3152, n, dtype)
    diagonal = torch.zeros(n, device=DEVICE)
    a, b = torch.zeros(n, n, device=DEVICE), torch.zeros(n, n, device=DEVICE)
    ops.gram_accumulate_([a, diagonal], [x, x])
    first = diagonal.clone()
    ops.gram_accumulate_([b, diagonal.zero_()], [x, x])
    assert torch.equal(a, b)
    assert torch.equal(first, diagonal)


def test_empty_inputs_leave_grams_unchanged():
    g = torch.ones(5, 5, device=DEVICE)
    ops.gram_accumulate_([g], [torch.zeros(0, 5, device=DEVICE, dtype=torch.bfloat16)])
    assert torch.equal(g, torch.ones(5, 5, device=DEVICE))


def test_mixed_cpu_and_gpu_entries_are_refused():
    with pytest.raises(RuntimeError, match=r"grams\[1\] is on cpu but entry 0 is on cuda:\d+; all entries of one call"):
        ops.gram_accumulate_(
            [torch.zeros(3, 3, device=DEVICE), torch.zeros(3, 3)],
            [torch.randn(4, 3, device=DEVICE), torch.randn(4, 3)],
        )


def test_gram_runs_on_the_current_stream():
    x = activations(3152, 768, torch.bfloat16)
    g = torch.zeros(768, 768, device=DEVICE)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.gram_accumulate_([g], [x])
    torch.cuda.current_stream().wait_stream(stream)
    assert rel_err(g, exact_gram(x, torch.float32)) < REL_TOL[torch.float32]


# ----------------------------------------------------------------------------------------- merge


def client_gram(n: int, dtype: torch.dtype, diagonal: bool, seed: int, transposed: bool = False) -> torch.Tensor:
    """The Gram of 2n + 3 layer-like inputs on the GPU; ``transposed``: strided and not symmetric, so that F G
    must use G as stored."""
    g = random_gram(n, 2 * n + 3, device=DEVICE, diagonal=diagonal, seed=seed, spread=True)
    if transposed and not diagonal:
        g = (g + 0.01 * torch.randn_like(g)).T
    return g.to(dtype)


def weighted_expected(gram, factor, left, acc):
    """(G, [L] F G) in float64 from inputs rounded to the accumulator dtype, as the op upcasts them."""
    g, f = gram.to(acc).double(), factor.to(acc).double()
    fg = f * g if g.dim() == 1 else f @ g
    return g, (fg if left is None else left.to(acc).double() @ fg)


RANKS = [1, 2, 15, 16, 17, 33, 64]


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("acc", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_lefts", [False, True])
def test_gram_weighted_accumulate_matches_float64(rank, acc, with_lefts):
    widths = [1, 7, 64, 65, 130, 768]
    gram_dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    gram_sums, weighted, grams, factors, lefts, expected = [], [], [], [], [], []
    for i, n in enumerate(widths):
        diagonal = i % 3 == 2
        g = client_gram(n, gram_dtypes[i % 4], diagonal, seed=i, transposed=i % 2 == 1)
        f = torch.randn(rank, n, device=DEVICE, dtype=torch.float32)
        left = torch.randn(2 * rank + 1, rank, device=DEVICE, dtype=torch.float64) if with_lefts else None
        rows = left.shape[0] if with_lefts else rank
        gs0 = torch.randn(g.shape, device=DEVICE, dtype=acc)
        ws0 = torch.randn(rows, n, device=DEVICE, dtype=acc)
        gram_sums.append(gs0.clone())
        weighted.append(ws0.clone())
        grams.append(g)
        factors.append(f)
        lefts.append(left)
        eg, ew = weighted_expected(g, f, left, acc)
        expected.append((gs0.double() + eg, ws0.double() + ew))
    ops.gram_weighted_accumulate_(gram_sums, weighted, grams, factors, lefts if with_lefts else None)
    for gs, ws, (eg, ew) in zip(gram_sums, weighted, expected):
        assert rel_err(gs, eg) < REL_TOL[acc]
        assert rel_err(ws, ew) < 10 * REL_TOL[acc]


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("acc", [torch.float32, torch.float64])
def test_projected_accumulate_matches_float64(rank, acc):
    widths = [1, 7, 64, 65, 130, 768]
    gram_dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    psums, wsums, grams, shared, factors, expected = [], [], [], [], [], []
    for i, n in enumerate(widths):
        diagonal = i % 3 == 2
        g = client_gram(n, gram_dtypes[i % 4], diagonal, seed=i, transposed=i % 2 == 1)
        a = torch.randn(rank, n, device=DEVICE, dtype=torch.bfloat16 if i % 2 else torch.float32)
        b = torch.randn(3 * rank + 2, rank, device=DEVICE, dtype=torch.float32)
        ps0 = torch.randn(rank, rank, device=DEVICE, dtype=acc)
        ws0 = torch.randn(b.shape[0], rank, device=DEVICE, dtype=acc)
        psums.append(ps0.clone())
        wsums.append(ws0.clone())
        grams.append(g)
        shared.append(a)
        factors.append(b)
        gd, ad, bd = g.to(acc).double(), a.to(acc).double(), b.to(acc).double()
        p = ((ad * gd) if gd.dim() == 1 else ad @ gd) @ ad.T
        expected.append((ps0.double() + p, ws0.double() + bd @ p))
    ops.projected_accumulate_(psums, wsums, grams, shared, factors)
    for ps, ws, (ep, ew) in zip(psums, wsums, expected):
        assert rel_err(ps, ep) < 10 * REL_TOL[acc]
        assert rel_err(ws, ew) < 10 * REL_TOL[acc]


@pytest.mark.parametrize("diagonal", [False, True])
def test_streaming_clients_equal_batch(diagonal):
    """K clients added one call at a time equal the float64 sums over all of them, for both merge ops."""
    n, rank, clients = 300, 16, 25
    grams = [client_gram(n, torch.float32, diagonal, seed=k) for k in range(clients)]
    factors = [torch.randn(rank, n, device=DEVICE) for _ in range(clients)]
    bs = [torch.randn(50, rank, device=DEVICE) for _ in range(clients)]
    shared = torch.randn(rank, n, device=DEVICE)
    g_sum = torch.zeros(grams[0].shape, device=DEVICE, dtype=torch.float64)
    w_sum = torch.zeros(rank, n, device=DEVICE, dtype=torch.float64)
    p_sum = torch.zeros(rank, rank, device=DEVICE, dtype=torch.float64)
    bp_sum = torch.zeros(50, rank, device=DEVICE, dtype=torch.float64)
    for g, f, b in zip(grams, factors, bs):
        ops.gram_weighted_accumulate_([g_sum], [w_sum], [g], [f])
        ops.projected_accumulate_([p_sum], [bp_sum], [g], [shared], [b])
    gd = [g.double() for g in grams]
    times = (lambda m, g: m * g) if diagonal else (lambda m, g: m @ g)
    a = shared.double()
    projections = [times(a, g) @ a.T for g in gd]
    assert rel_err(g_sum, sum(gd)) < 1e-12
    assert rel_err(w_sum, sum(times(f.double(), g) for f, g in zip(factors, gd))) < 1e-12
    assert rel_err(p_sum, sum(projections)) < 1e-12
    assert rel_err(bp_sum, sum(b.double() @ p for b, p in zip(bs, projections))) < 1e-12


def test_merge_entries_sharing_accumulators():
    """Two entries adding into the same sums run one after the other; overlap within one entry is refused."""
    n, rank = 100, 4
    g1, g2 = client_gram(n, torch.float32, False, seed=1), client_gram(n, torch.float32, False, seed=2)
    f1, f2 = torch.randn(rank, n, device=DEVICE), torch.randn(rank, n, device=DEVICE)
    gs = torch.zeros(n, n, device=DEVICE, dtype=torch.float64)
    ws = torch.zeros(rank, n, device=DEVICE, dtype=torch.float64)
    ops.gram_weighted_accumulate_([gs, gs], [ws, ws], [g1, g2], [f1, f2])
    e1, e2 = weighted_expected(g1, f1, None, torch.float64), weighted_expected(g2, f2, None, torch.float64)
    assert rel_err(gs, e1[0] + e2[0]) < 1e-12
    assert rel_err(ws, e1[1] + e2[1]) < 1e-12
    buffer = torch.zeros(n * n + rank * n, device=DEVICE, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="share memory"):
        ops.gram_weighted_accumulate_(
            [buffer[: n * n].view(n, n)], [buffer[n : n + rank * n].view(rank, n)], [g1], [f1]
        )


def test_merge_matches_cpu_implementation():
    n, rank = 200, 8
    g = client_gram(n, torch.float32, False, seed=3)
    f = torch.randn(rank, n, device=DEVICE)
    sums = {}
    for device in ("cpu", DEVICE):
        gs = torch.zeros(n, n, dtype=torch.float64, device=device)
        ws = torch.zeros(rank, n, dtype=torch.float64, device=device)
        ops.gram_weighted_accumulate_([gs], [ws], [g.to(device)], [f.to(device)])
        sums[device] = (gs.cpu(), ws.cpu())
    assert torch.equal(sums["cpu"][0], sums[DEVICE][0])  # the Gram sum is a plain add in both
    assert rel_err(sums[DEVICE][1], sums["cpu"][1]) < 1e-13


def test_merge_is_bitwise_reproducible():
    g = client_gram(768, torch.float32, False, seed=4)
    f = torch.randn(16, 768, device=DEVICE)
    results = []
    for _ in range(2):
        gs = torch.zeros(768, 768, dtype=torch.float64, device=DEVICE)
        ws = torch.zeros(16, 768, dtype=torch.float64, device=DEVICE)
        ops.gram_weighted_accumulate_([gs], [ws], [g], [f])
        results.append(ws)
    assert torch.equal(results[0], results[1])


def test_merge_with_many_layers_spans_several_launches():
    layers = 200
    grams = [client_gram(5 + i % 40, torch.float32, i % 5 == 0, seed=i) for i in range(layers)]
    factors = [torch.randn(3, g.shape[0], device=DEVICE) for g in grams]
    gram_sums = [torch.zeros(g.shape, device=DEVICE, dtype=torch.float64) for g in grams]
    weighted = [torch.zeros(3, g.shape[0], device=DEVICE, dtype=torch.float64) for g in grams]
    ops.gram_weighted_accumulate_(gram_sums, weighted, grams, factors)
    for gs, ws, g, f in zip(gram_sums, weighted, grams, factors):
        eg, ew = weighted_expected(g, f, None, torch.float64)
        assert rel_err(gs, eg) < 1e-12
        assert rel_err(ws, ew) < 1e-12


def test_merger_end_to_end_on_gpu():
    """The Python merger on CUDA tensors equals the float64 reference merge."""
    from lorm_ext.merge import RegMeanMerger
    from lorm_ext.reference import regmean_ref

    n, rank, clients = 128, 4, 6
    grams = [client_gram(n, torch.float32, False, seed=k) for k in range(clients)]
    factors = [torch.randn(rank, n, device=DEVICE) for _ in range(clients)]
    merger = RegMeanMerger(device=DEVICE)
    for g, f in zip(grams, factors):
        merger.add_client({"layer": f}, {"layer": g})
    merged = merger.merge()["layer"]
    expected = regmean_ref([f.cpu() for f in factors], [g.cpu() for g in grams])
    assert rel_err(merged.cpu(), expected) < 1e-8


# ---------------------------------------------------------------------------- both implementations

KERNELS = ["aten", "custom"]


def under_each(fn) -> dict:
    """{implementation: fn()} for the ATen implementation and the custom kernels."""
    results = {}
    for name in KERNELS:
        with ops.use_cuda_kernels(name):
            results[name] = fn()
    return results


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("acc", [torch.float32, torch.float64])
@pytest.mark.parametrize("diagonal", [False, True])
def test_implementations_agree_on_gram_accumulation(dtype, acc, diagonal):
    """Widths below, at and above the ATen path's 1024-column panels and one launch's tiles, on Grams that
    already hold a symmetric sum: both within rounding of float64, and both updates exactly symmetric."""
    shapes = [(3152, 768), (40, 1100), (700, 33), (5, 1), (300, 2050)]
    xs = [activations(rows, n, dtype, seed=i) for i, (rows, n) in enumerate(shapes)]
    starts = []
    for x in xs:
        n = x.shape[1]
        start = torch.rand(n, device=DEVICE, dtype=acc) if diagonal else torch.randn(n, n, device=DEVICE, dtype=acc)
        starts.append(start if diagonal else start + start.T)

    def accumulate():
        grams = [s.clone() for s in starts]
        ops.gram_accumulate_(grams, xs)
        return grams

    results = under_each(accumulate)
    for aten, custom, start, x in zip(results["aten"], results["custom"], starts, xs):
        exact = start.double() + exact_gram(x, acc, diagonal)
        assert rel_err(aten, exact) < REL_TOL[acc], ("aten", x.shape)
        assert rel_err(custom, exact) < REL_TOL[acc], ("custom", x.shape)
        assert rel_err(aten, custom) < 2 * REL_TOL[acc], x.shape
        if not diagonal:
            assert torch.equal(aten, aten.T) and torch.equal(custom, custom.T), x.shape


@pytest.mark.parametrize("acc", [torch.float32, torch.float64])
@pytest.mark.parametrize("rank", [1, 17])
def test_implementations_agree_on_merge_reductions(acc, rank):
    widths = [1, 65, 768, 1100]
    gram_dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float16]
    grams = [client_gram(n, gram_dtypes[i], i % 2 == 1, seed=i, transposed=i == 2) for i, n in enumerate(widths)]
    factors = [torch.randn(rank, n, device=DEVICE) for n in widths]
    lefts = [torch.randn(3, rank, device=DEVICE, dtype=torch.float64) for _ in widths]
    bs = [torch.randn(40, rank, device=DEVICE, dtype=torch.bfloat16) for _ in widths]
    shared = [torch.randn(rank, n, device=DEVICE) for n in widths]

    def reduce():
        out = []
        for with_lefts in (False, True):
            gs = [torch.ones(g.shape, device=DEVICE, dtype=acc) for g in grams]
            ws = [torch.ones(3 if with_lefts else rank, n, device=DEVICE, dtype=acc) for n in widths]
            ops.gram_weighted_accumulate_(gs, ws, grams, factors, lefts if with_lefts else None)
            out.append((gs, ws))
        ps = [torch.ones(rank, rank, device=DEVICE, dtype=acc) for _ in widths]
        bps = [torch.ones(40, rank, device=DEVICE, dtype=acc) for _ in widths]
        ops.projected_accumulate_(ps, bps, grams, shared, bs)
        return out, (ps, bps)

    results = under_each(reduce)
    for i, g in enumerate(grams):
        gd, ad, bd = g.to(acc).double(), shared[i].to(acc).double(), bs[i].to(acc).double()
        p = (ad * gd if gd.dim() == 1 else ad @ gd) @ ad.T
        expected = [weighted_expected(g, factors[i], None, acc), weighted_expected(g, factors[i], lefts[i], acc)]
        for name in KERNELS:
            weighted, (ps, bps) = results[name]
            for (gs, ws), (eg, ew) in zip(weighted, expected):
                assert rel_err(gs[i], 1 + eg) < REL_TOL[acc], (name, i)
                assert rel_err(ws[i], 1 + ew) < 10 * REL_TOL[acc], (name, i)
            assert rel_err(ps[i], 1 + p) < 10 * REL_TOL[acc], (name, i)
            assert rel_err(bps[i], 1 + bd @ p) < 10 * REL_TOL[acc], (name, i)
        for (aten_gs, aten_ws), (custom_gs, custom_ws) in zip(results["aten"][0], results["custom"][0]):
            assert torch.equal(aten_gs[i], custom_gs[i])  # one exact add of the upcast Gram in both
            assert rel_err(aten_ws[i], custom_ws[i].double()) < 10 * REL_TOL[acc]


def test_implementations_agree_on_gram_stats():
    """Both compute every statistic in float64 from the same values, so they agree exactly: Grams of all
    input dtypes, full and diagonal, with NaN, Inf, asymmetric pairs and negative diagonals, more of them than
    one launch holds."""
    from test_ops import gram_stats_truth

    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    grams = []
    for i in range(300):
        n = [1, 2, 31, 33, 100, 1500][i % 6] if i < 12 else 1 + i % 40
        g = client_gram(n, torch.float64, i % 5 == 0, seed=i).to(dtypes[i % 4])
        if i % 3 == 0:
            flat = g.view(-1)
            flat[(7 * i) % flat.numel()] = float("nan") if i % 2 else float("inf")
        if i % 4 == 1 and g.dim() == 2 and n > 1:
            g[0, n - 1] += 1.5
            g[n - 1, n - 1] = -2.0
        grams.append(g)
    results = under_each(lambda: ops.gram_stats(grams))
    assert torch.equal(results["aten"], results["custom"])
    for g, row in zip(grams, results["custom"].tolist()):
        if torch.isfinite(g if g.dim() == 1 else g.diagonal()).any():  # the truth needs a finite diagonal entry
            assert row == pytest.approx(gram_stats_truth(g), rel=1e-12), (tuple(g.shape), g.dtype)


@pytest.mark.parametrize("kernels", KERNELS)
def test_ops_can_be_captured_in_a_cuda_graph(kernels):
    """The accumulation ops and gram_stats need no host synchronisation: captured once in a CUDA graph and
    replayed twice, they add their sums twice and return the statistics of the eager call."""
    n, r = 300, 8
    x = activations(700, n, torch.bfloat16)
    gram_k = client_gram(n, torch.float32, False, seed=1)
    diagonal_k = client_gram(n, torch.float32, True, seed=2)
    a, b = torch.randn(r, n, device=DEVICE), torch.randn(30, r, device=DEVICE)
    sums = {
        "gram": torch.zeros(n, n, device=DEVICE),
        "diagonal": torch.zeros(n, device=DEVICE),
        "gram_sum": torch.zeros(n, n, device=DEVICE, dtype=torch.float64),
        "weighted": torch.zeros(r, n, device=DEVICE, dtype=torch.float64),
        "projection": torch.zeros(r, r, device=DEVICE, dtype=torch.float64),
        "projected": torch.zeros(30, r, device=DEVICE, dtype=torch.float64),
    }

    def step():
        ops.gram_accumulate_([sums["gram"], sums["diagonal"]], [x, x])
        ops.gram_weighted_accumulate_([sums["gram_sum"]], [sums["weighted"]], [gram_k], [a])
        ops.projected_accumulate_([sums["projection"]], [sums["projected"]], [gram_k], [a], [b])
        return ops.gram_stats([gram_k, diagonal_k])

    with ops.use_cuda_kernels(kernels):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph, as torch.cuda.graph asks
            eager_stats = step()
        torch.cuda.current_stream().wait_stream(side)
        eager = {key: value.clone() for key, value in sums.items()}
        for value in sums.values():
            value.zero_()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured_stats = step()
        graph.replay()
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(captured_stats, eager_stats)
    for key, value in sums.items():
        assert rel_err(value, 2 * eager[key].double()) < 1e-6, key
