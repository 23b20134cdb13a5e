"""The streaming PEFT merge (lorm_ext.adapter_merge) and its files: against the in-memory AdapterMerger and
lorm_ext.reference, shared Grams, Gram storage layouts and dtypes, memory flat in the number of adapters,
errors mid-stream, bounded rank_pattern matching, and every bad input it refuses."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lorm_testing import assert_rel_close, random_gram, seeded_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lorm_ext import adapter_merge, adapters, merge_cli, reference
from lorm_ext.adapter_merge import merge_lora_adapters
from lorm_ext.adapters import AdapterFileError, GramFile, read_grams, read_lora_adapter, save_grams
from lorm_ext.gram import GramCollector
from lorm_ext.merge import AdapterMerger, FactoredNumerator, _top_singular, low_rank_exact

ROOT = Path(__file__).resolve().parents[1]
HIDDEN, FFN = 12, 20
# A LLaMA-like block: q/k/v read the normed hidden state, gate/up the second normed state.
LAYOUT = {}
for _block in range(2):
    for _name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        LAYOUT[f"layers.{_block}.self_attn.{_name}"] = (HIDDEN, HIDDEN)
    LAYOUT[f"layers.{_block}.mlp.gate_proj"] = (FFN, HIDDEN)
    LAYOUT[f"layers.{_block}.mlp.up_proj"] = (FFN, HIDDEN)
    LAYOUT[f"layers.{_block}.mlp.down_proj"] = (HIDDEN, FFN)


def input_of(module: str) -> str:
    """The module whose input this module reads (q/k/v read q's, gate/up gate's)."""
    block, _, name = module.rpartition(".")
    return {"k_proj": f"{block}.q_proj", "v_proj": f"{block}.q_proj", "up_proj": f"{block}.gate_proj"}.get(name, module)


def write_adapter(path: Path, rank: int, *, seed: int, alpha: float = 16.0, dtype=torch.float32, config=None) -> dict:
    """A PEFT adapter folder of random factors; returns {module: ΔW = s B A} in float64."""
    g = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True)
    tensors, deltas = {}, {}
    for module, (out, width) in LAYOUT.items():
        a = torch.randn(rank, width, generator=g).to(dtype)
        b = torch.randn(out, rank, generator=g).to(dtype)
        key_b, key_a = adapters.factor_keys(module)
        tensors[key_a], tensors[key_b] = a, b
        deltas[module] = (alpha / rank) * b.double() @ a.double()
    save_file(tensors, path / adapters.WEIGHTS_NAME)
    settings = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": ["q_proj"],
        "task_type": None,
        "base_model_name_or_path": "tiny-llama",
    } | (config or {})
    (path / adapters.CONFIG_NAME).write_text(json.dumps(settings))
    return deltas


def shared_grams(seed: int, *, diagonal: bool = False) -> dict[str, torch.Tensor]:
    """Grams of one client, the modules reading one input holding the same tensor object (as collect_grams)."""
    torch.manual_seed(seed)
    by_input = {}
    for module, (_, width) in LAYOUT.items():
        if input_of(module) not in by_input:
            by_input[input_of(module)] = random_gram(width, 3 * width, diagonal=diagonal).float()
    return {module: by_input[input_of(module)] for module in LAYOUT}


@pytest.fixture
def clients(tmp_path):
    """Four adapters of ranks 3, 3, 5, 3 with their full Gram files (upper triangle, float32)."""
    dirs, files, deltas, grams = [], [], [], []
    for k, rank in enumerate((3, 3, 5, 3)):
        deltas.append(write_adapter(tmp_path / f"adapter{k}", rank, seed=k))
        grams.append(shared_grams(10 + k))
        save_grams(tmp_path / f"grams{k}.safetensors", grams[-1])
        dirs.append(tmp_path / f"adapter{k}")
        files.append(tmp_path / f"grams{k}.safetensors")
    return dirs, files, deltas, grams


def in_memory_merge(dirs, files, rank):
    """The same merge through the in-memory API: whole adapters and Grams, AdapterMerger."""
    merger = AdapterMerger(rank)
    for d, f in zip(dirs, files):
        adapter = read_lora_adapter(d)
        grams = read_grams(f, {m: a.shape[1] for m, (_, a) in adapter.factors.items()})
        merger.add_client(
            {m: b for m, (b, _) in adapter.factors.items()},
            {m: a for m, (_, a) in adapter.factors.items()},
            {m: g.double() for m, g in grams.items()},
        )
    return merger


@pytest.mark.parametrize("workers", [1, 3])
def test_streamed_merge_equals_in_memory_merge_and_reference(clients, tmp_path, workers):
    dirs, files, deltas, grams = clients
    result = merge_lora_adapters(dirs, files, 2, report=True, workers=workers, output_dir=tmp_path / "merged")
    merger = in_memory_merge(dirs, files, 2)
    in_memory = merger.merge("exact")
    assert set(result.objectives) == {"exact", "alternating", "svd", "zero"}  # ranks differ: no average
    for method, values in merger.objective(in_memory).items():
        assert result.objectives["exact"][method] == pytest.approx(values, rel=1e-9)
    written = read_lora_adapter(tmp_path / "merged")
    for module in LAYOUT:
        ds, gs = [d[module] for d in deltas], [g[module].double() for g in grams]
        eye = torch.eye(LAYOUT[module][1], dtype=torch.float64)
        B_ref, A_ref = reference.rank_r_optimum_ref(ds, [eye] * len(ds), gs, 2)
        B, A = result.factors[module]
        assert_rel_close(B @ A, B_ref @ A_ref, 1e-9)
        assert_rel_close(B @ A, in_memory[module][0] @ in_memory[module][1], 1e-9)
        assert_rel_close(written.factors[module][0] @ written.factors[module][1], B_ref @ A_ref, 1e-5)  # float32 file
        for method in ("exact", "alternating", "svd", "zero"):
            if method == "zero":
                delta = torch.zeros_like(ds[0])
            elif method == "svd":
                svd = torch.linalg.svd(sum(ds) / len(ds))
                delta = (svd.U[:, :2] * svd.S[:2]) @ svd.Vh[:2]
            else:
                delta = B @ A if method == "exact" else None
            if delta is not None:
                want = reference.objective_ref(delta, ds, gs).item()
                assert result.objectives[method][module] == pytest.approx(want, rel=1e-8), (method, module)
        assert result.objectives["alternating"][module] >= result.objectives["exact"][module] * (1 - 1e-9)


@pytest.mark.parametrize("small_panels", [False, True])
@pytest.mark.parametrize(
    ("layout", "dtype", "diagonal"),
    [
        ("full", torch.float32, False),
        ("triangle", torch.bfloat16, False),
        ("triangle", torch.float16, False),
        ("triangle", torch.float64, True),
        ("triangle", torch.bfloat16, True),
    ],
)
def test_gram_storage_reads_back_exactly_and_merges_like_the_reference(
    tmp_path, monkeypatch, layout, dtype, diagonal, small_panels
):
    if small_panels:  # many panels per Gram (triangles of 5 rows, folds of 4 rows), as for 4096 wide Grams
        monkeypatch.setattr(adapters, "TRIANGLE_PANEL_ROWS", 5)
        monkeypatch.setattr(adapters, "_PANEL_ENTRIES", 50)
        monkeypatch.setattr(adapter_merge, "_PANEL_ENTRIES", 50)
    deltas = [write_adapter(tmp_path / f"a{k}", 2, seed=k) for k in range(2)]
    grams = [shared_grams(k, diagonal=diagonal) for k in range(2)]
    files = []
    for k, g in enumerate(grams):
        save_grams(tmp_path / f"g{k}.safetensors", g, layout=layout, dtype=dtype)
        files.append(tmp_path / f"g{k}.safetensors")
    stored = [{m: gram.to(dtype).double() for m, gram in g.items()} for g in grams]  # what the file holds
    for k, f in enumerate(files):
        back = read_grams(f, {m: w for m, (_, w) in LAYOUT.items()})
        for m in LAYOUT:
            assert back[m].dtype == dtype and torch.equal(back[m].double(), stored[k][m])
        assert back["layers.0.self_attn.q_proj"] is back["layers.0.self_attn.v_proj"]
    result = merge_lora_adapters([tmp_path / "a0", tmp_path / "a1"], files, 2)
    for module in LAYOUT:
        ds, gs = [d[module] for d in deltas], [s[module] for s in stored]
        eye = torch.eye(LAYOUT[module][1], dtype=torch.float64)
        B_ref, A_ref = reference.rank_r_optimum_ref(ds, [eye] * 2, gs, 2)
        B, A = result.factors[module]
        assert_rel_close(B @ A, B_ref @ A_ref, 1e-9)


def test_gram_file_sizes_and_sharing(tmp_path):
    grams = shared_grams(0)
    save_grams(tmp_path / "full32.safetensors", grams, layout="full")
    save_grams(tmp_path / "tri32.safetensors", grams)
    save_grams(tmp_path / "tri16.safetensors", grams, dtype=torch.bfloat16)
    unshared = {m: g.clone() for m, g in grams.items()}
    save_grams(tmp_path / "unshared.safetensors", unshared, layout="full")
    with_index = GramFile(tmp_path / "tri32.safetensors")
    assert len(set(with_index.index.values())) == 8  # per block: q/k/v, o, gate/up, down
    assert (
        with_index.index["layers.1.self_attn.q_proj"]
        == with_index.index["layers.1.self_attn.v_proj"]
        == "layers.1.self_attn.k_proj"
    )  # named after the first sharer in sorted order
    data = {
        p: sum(v.numel() * v.element_size() for v in load_file(tmp_path / p).values())
        for p in ("full32.safetensors", "tri32.safetensors", "tri16.safetensors", "unshared.safetensors")
    }
    assert data["unshared.safetensors"] == 12 * HIDDEN * HIDDEN * 4 + 2 * FFN * FFN * 4
    assert data["full32.safetensors"] == 6 * HIDDEN * HIDDEN * 4 + 2 * FFN * FFN * 4
    assert data["tri32.safetensors"] == (6 * adapters.triangle_entries(HIDDEN) + 2 * adapters.triangle_entries(FFN)) * 4
    assert data["tri16.safetensors"] * 2 == data["tri32.safetensors"]
    for width in (4096, 11008):  # panels of 256 rows: their diagonal blocks whole, a few % above n(n+1)/2
        assert width * (width + 1) / 2 < adapters.triangle_entries(width) < 0.54 * width * width


def test_first_gram_format_still_reads(tmp_path):
    """A file of the first format (one dense tensor per module, no index) merges as before."""
    write_adapter(tmp_path / "a0", 2, seed=0)
    write_adapter(tmp_path / "a1", 2, seed=1)
    grams = [shared_grams(k) for k in range(2)]
    save_file({m: g.clone() for m, g in grams[0].items()}, tmp_path / "old.safetensors")
    save_grams(tmp_path / "new.safetensors", grams[0])
    save_grams(tmp_path / "g1.safetensors", grams[1])
    dirs = [tmp_path / "a0", tmp_path / "a1"]
    old = merge_lora_adapters(dirs, [tmp_path / "old.safetensors", tmp_path / "g1.safetensors"], 2)
    new = merge_lora_adapters(dirs, [tmp_path / "new.safetensors", tmp_path / "g1.safetensors"], 2)
    for module in LAYOUT:
        assert_rel_close(
            old.factors[module][0] @ old.factors[module][1], new.factors[module][0] @ new.factors[module][1], 1e-12
        )


def test_each_gram_is_read_once_per_adapter_and_only_the_asked_method_runs(clients, monkeypatch):
    dirs, files, _, _ = clients
    reads = []
    panels = GramFile.panels

    def counting_panels(self, key, modules):
        reads.append((str(self.path), key))
        yield from panels(self, key, modules)

    def never(*args, **kwargs):
        raise AssertionError("alternating steps ran though only 'exact' was asked for")

    monkeypatch.setattr(GramFile, "panels", counting_panels)
    monkeypatch.setattr(adapter_merge, "low_rank_alternating", never)
    result = merge_lora_adapters(dirs, files, 2, method="exact")
    assert set(result.objectives) == {"exact", "zero"}
    assert len(reads) == len(set(reads)) == len(files) * 8  # eight distinct inputs per file, each read once
    with pytest.raises(AssertionError, match="alternating steps ran"):
        merge_lora_adapters(dirs, files, 2, method="exact", report=True)


class TinyLlamaBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
        self.self_attn = nn.ModuleDict(
            {n: nn.Linear(HIDDEN, HIDDEN, bias=False) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        )
        self.mlp = nn.ModuleDict(
            {
                "gate_proj": nn.Linear(HIDDEN, FFN, bias=False),
                "up_proj": nn.Linear(HIDDEN, FFN, bias=False),
                "down_proj": nn.Linear(FFN, HIDDEN, bias=False),
            }
        )

    def forward(self, x):
        h = self.input_layernorm(x)
        attn = self.self_attn
        q, k, v = attn["q_proj"](h), attn["k_proj"](h), attn["v_proj"](h)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(HIDDEN), dim=-1)
        x = x + attn["o_proj"](weights @ v)
        h = self.post_attention_layernorm(x)
        mlp = self.mlp
        return x + mlp["down_proj"](torch.nn.functional.silu(mlp["gate_proj"](h)) * mlp["up_proj"](h))


class TinyLlama(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([TinyLlamaBlock() for _ in range(2)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_collector_detects_modules_that_read_one_input(tmp_path):
    model = seeded_model(TinyLlama)
    batches = [torch.randn(2, 5, HIDDEN) for _ in range(3)]
    pattern = r"(q|k|v|o|gate|up|down)_proj$"
    shared, separate = GramCollector(model, pattern, share_inputs=True), GramCollector(model, pattern)
    with torch.no_grad():
        for collector in (shared, separate):
            with collector:
                for x in batches:
                    model(x)
    for block in ("layers.0", "layers.1"):
        q, k, v = (f"{block}.self_attn.{n}_proj" for n in "qkv")
        gate, up = f"{block}.mlp.gate_proj", f"{block}.mlp.up_proj"
        assert shared.grams[k] is shared.grams[q] and shared.grams[v] is shared.grams[q]
        assert shared.grams[up] is shared.grams[gate]
        assert shared.shared_input[k] == q and shared.shared_input[up] == gate
        assert shared.shared_input[f"{block}.self_attn.o_proj"] == f"{block}.self_attn.o_proj"
    assert len({id(g) for g in shared.grams.values()}) == 8
    for name, gram in separate.grams.items():
        torch.testing.assert_close(shared.grams[name], gram, rtol=0, atol=0)
        assert shared.num_tokens[name] == separate.num_tokens[name] == 30
    save_grams(tmp_path / "g.safetensors", shared.grams)
    assert len(load_file(tmp_path / "g.safetensors")) == 8


class SometimesShared(nn.Module):
    """b reads a's input in the first pass and a different tensor in the second."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.a(x) + self.b(x if self.calls == 1 else x + 1)


def test_collector_refuses_sharing_that_changes_between_passes():
    model = SometimesShared()
    collector = GramCollector(model, r"^(a|b)$", share_inputs=True)
    with torch.no_grad(), collector:
        model(torch.randn(3, 4))
        with pytest.raises(
            RuntimeError, match=r"layer 'b' read the input of 'a' in an earlier forward pass but its own"
        ):
            model(torch.randn(3, 4))


def test_exact_solver_cholesky_eigh_and_sketch_agree_with_reference():
    torch.manual_seed(1)
    out, width, rank = 30, 24, 3
    Bs = [torch.randn(out, 2, dtype=torch.float64) for _ in range(3)]
    As = [torch.randn(2, width, dtype=torch.float64) for _ in range(3)]
    for grams in (
        [random_gram(width, 60) for _ in range(3)],  # positive definite: Cholesky
        [random_gram(width, 5) for _ in range(3)],
    ):  # rank 15 < 24: the eigendecomposition fallback
        G, N = reference.gram_and_product_sums_ref(Bs, As, grams, torch.float64)
        B_ref, A_ref = reference.rank_r_optimum_ref(Bs, As, grams, rank)
        for bound in (None, 6):  # full SVD, and the sketch: rank(N) <= Σ r_k = 6
            B, A = low_rank_exact(N, G, rank, rank_bound=bound)
            assert_rel_close(B @ A, B_ref @ A_ref, 1e-9)
            assert_rel_close(A @ G @ A.T, torch.eye(rank, dtype=torch.float64), 1e-9)
        # N kept as its factors (R = Σ r_k = 6), and with fewer factor columns than the rank (solved densely)
        B, A = low_rank_exact(
            FactoredNumerator(torch.cat(Bs, 1), torch.cat([a @ g for a, g in zip(As, grams)])), G, rank
        )
        assert_rel_close(B @ A, B_ref @ A_ref, 1e-9)
        B, A = low_rank_exact(FactoredNumerator(Bs[0], As[0] @ grams[0]), grams[0], rank)  # R = 2 < rank = 3
        B_one, A_one = low_rank_exact(Bs[0] @ As[0] @ grams[0], grams[0], rank)
        assert_rel_close(B @ A, B_one @ A_one, 1e-9)
    left, right = torch.randn(40, 7, dtype=torch.float64), torch.randn(7, 50, dtype=torch.float64)
    full = torch.linalg.svd(left @ right, full_matrices=False)
    for x in (left @ right, FactoredNumerator(left, right)):  # the sketch, and the factors' own basis
        U, S, Vh = _top_singular(x, 4, 7)
        torch.testing.assert_close(S, full.S[:4], rtol=1e-12, atol=0)
        assert_rel_close((U * S) @ Vh, (full.U[:, :4] * full.S[:4]) @ full.Vh[:4], 1e-12)
    for shape in ((40, 30), (30, 40), (30, 30)):  # dense, no bound: tall (QR first), wide (QR of xᵀ), square
        x = torch.randn(2, *shape, dtype=torch.float64)
        U, S, Vh = _top_singular(x, 4, None)
        dense = torch.linalg.svd(x, full_matrices=False)
        torch.testing.assert_close(S, dense.S[:, :4], rtol=1e-12, atol=0)
        assert_rel_close((U * S.unsqueeze(-2)) @ Vh, (dense.U[..., :4] * dense.S[:, None, :4]) @ dense.Vh[:, :4], 1e-12)
    # a batch of factored numerators with a weight W on the right (the Cholesky path's L⁻ᵀ): orthonormal
    # singular vectors of each x = L R W, the SVD of the dense product's
    lefts, rights = torch.randn(2, 40, 7, dtype=torch.float64), torch.randn(2, 7, 50, dtype=torch.float64)
    weight = torch.randn(50, 50, dtype=torch.float64)
    U, S, Vh = _top_singular(FactoredNumerator(lefts, rights), 4, None, lambda m: m @ weight)
    dense = torch.linalg.svd(lefts @ rights @ weight, full_matrices=False)
    eye = torch.eye(4, dtype=torch.float64).expand(2, 4, 4)
    torch.testing.assert_close(U.mT @ U, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(Vh @ Vh.mT, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(S, dense.S[:, :4], rtol=1e-12, atol=0)
    assert_rel_close((U * S.unsqueeze(-2)) @ Vh, (dense.U[..., :4] * dense.S[:, None, :4]) @ dense.Vh[:, :4], 1e-12)


def test_stacked_dense_modules_are_solved_one_at_a_time_to_the_batched_result():
    torch.manual_seed(3)
    numerators = torch.randn(3, 20, 12, dtype=torch.float64)
    gram = random_gram(12, 40).unsqueeze(0)
    B, A = adapter_merge._exact(numerators, gram, 2, 24)
    B_batched, A_batched = low_rank_exact(numerators, gram, 2, rank_bound=24)
    assert B.shape == B_batched.shape and A.shape == A_batched.shape
    assert_rel_close(B @ A, B_batched @ A_batched, 1e-12)


PEAK_SCRIPT = r"""
import sys, threading, time, torch
from lorm_ext.adapter_merge import merge_lora_adapters
dirs, files = sys.argv[2].split(","), sys.argv[3].split(",")
torch.set_num_threads(1)
peak, done = [0], [False]
def anon_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
def sample():
    while not done[0]:
        peak[0] = max(peak[0], anon_kb())
        time.sleep(0.002)
merge_lora_adapters(dirs[:1], files[:1], 4, workers=1)  # warm up: imports, BLAS buffers
before = anon_kb()
sampler = threading.Thread(target=sample)
sampler.start()
merge_lora_adapters(dirs[: int(sys.argv[1])], files[: int(sys.argv[1])], 4, workers=1, keep_factors=False)
done[0] = True
sampler.join()
print((peak[0] - before) * 1024)
"""


def test_peak_memory_does_not_grow_with_the_number_of_adapters(tmp_path):
    """Anonymous memory (the sums; memory-mapped file pages are not counted) during merges of 2 and 16
    adapters whose inputs total 14 MB and 114 MB: one module's sums are 9.4 MB."""
    width = 768
    dirs, files = [], []
    for k in range(16):
        d = tmp_path / f"a{k}"
        d.mkdir()
        g = torch.Generator().manual_seed(k)
        tensors, grams = {}, {}
        for m in ("m0", "m1", "m2"):
            key_b, key_a = adapters.factor_keys(m)
            tensors[key_a], tensors[key_b] = torch.randn(4, width, generator=g), torch.randn(width, 4, generator=g)
            x = torch.randn(2 * width, width, generator=g)
            grams[m] = x.T @ x
        save_file(tensors, d / adapters.WEIGHTS_NAME)
        (d / adapters.CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4}))
        save_grams(tmp_path / f"g{k}.safetensors", {m: (v + v.T) / 2 for m, v in grams.items()}, layout="full")
        dirs.append(str(d))
        files.append(str(tmp_path / f"g{k}.safetensors"))
    peaks = {}
    for n in (2, 16):
        run = subprocess.run(
            [sys.executable, "-c", PEAK_SCRIPT, str(n), ",".join(dirs), ",".join(files)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=600,
            check=True,
        )
        peaks[n] = int(run.stdout.split()[-1])
    print("peak anonymous memory by number of adapters:", peaks)
    inputs_16 = 16 * 3 * (width * width * 4 + 2 * width * 4 * 4)
    assert peaks[16] < peaks[2] + 0.25 * inputs_16, (peaks, inputs_16)  # holding all inputs would add 88 %


def test_a_bad_tensor_mid_stream_names_file_and_module_and_leaves_no_output(clients, tmp_path):
    dirs, files, _, grams = clients
    late = "layers.1.mlp.down_proj"  # sorted last: the stream meets it after the other groups
    with safe_open(files[2], "pt") as f:  # the stored upper triangle, one entry made NaN
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors[late][FFN + 5] = float("nan")
    save_file(tensors, tmp_path / "nan.safetensors", metadata=metadata)
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(
        AdapterFileError, match=rf"nan.safetensors: module '{re.escape(late)}': gram contains NaN or Inf in rows 0..19"
    ):
        merge_lora_adapters(dirs, [*files[:2], tmp_path / "nan.safetensors", files[3]], 2, output_dir=out, workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output folder, no temporary folder

    tensors = load_file(dirs[1] / adapters.WEIGHTS_NAME)
    tensors[adapters.factor_keys(late)[1]][0, 0] = float("inf")
    save_file(tensors, dirs[1] / adapters.WEIGHTS_NAME)
    with pytest.raises(
        AdapterFileError, match=rf"adapter1/adapter_model.safetensors: module '{re.escape(late)}': .*Inf"
    ):
        merge_lora_adapters(dirs, files, 2, output_dir=out)
    assert not out.exists()


def test_truncated_or_missing_tensors_are_found_before_any_work(clients, tmp_path):
    dirs, files, _, grams = clients
    data = files[1].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    out = tmp_path / "out"
    with pytest.raises(AdapterFileError, match=r"cut.safetensors: cannot be read as safetensors: .*incomplete"):
        merge_lora_adapters(dirs, [files[0], tmp_path / "cut.safetensors", *files[2:]], 2, output_dir=out)
    weights = dirs[2] / adapters.WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(AdapterFileError, match=r"adapter2/adapter_model.safetensors: cannot be read"):
        merge_lora_adapters(dirs, files, 2, output_dir=out)
    partial = {m: g for m, g in grams[0].items() if m != "layers.1.self_attn.o_proj"}
    save_grams(tmp_path / "partial.safetensors", partial)
    with pytest.raises(
        AdapterFileError, match=r"partial.safetensors: has no Gram for module\(s\) \['layers.1.self_attn.o_proj'\]"
    ):
        merge_lora_adapters(dirs[:1], [tmp_path / "partial.safetensors"], 2, output_dir=out)
    assert not out.exists()


def test_reading_fails_mid_stream_with_the_file_and_module(clients, tmp_path, monkeypatch):
    """An I/O error while a module's tensor is read (e.g. the disk) names the file, the module and the tensor."""
    dirs, files, _, _ = clients
    from safetensors import SafetensorError

    class FailingHandle:
        """adapter3's file, whose gate_proj tensors fail to read as a failing disk makes safetensors fail."""

        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def get_tensor(self, key):
            if "layers.1.mlp.gate_proj" in key:
                raise SafetensorError("I/O error: input/output error")
            return self.handle.get_tensor(key)

        def __getattr__(self, name):
            return getattr(self.handle, name)

    real_open = adapters._open_safetensors
    monkeypatch.setattr(
        adapters,
        "_open_safetensors",
        lambda path: FailingHandle(real_open(path)) if "adapter3" in str(path) else real_open(path),
    )
    with pytest.raises(
        AdapterFileError,
        match=r"adapter3/adapter_model.safetensors: module 'layers.1.mlp.gate_proj': "
        r"tensor '.*' cannot be read: I/O error",
    ):
        merge_lora_adapters(dirs, files, 2, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_output_paths_that_cannot_be_written(clients, tmp_path, capsys):
    dirs, files, _, _ = clients
    (tmp_path / "file").write_text("x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    for target, message in [
        (tmp_path / "file", "exists and is not a folder"),
        (tmp_path / "file" / "merged", r"cannot be created: .*file is a file, not a folder"),
        (tmp_path / "busy", r"exists and holds other files than a PEFT adapter \(\['notes.txt'\]\)"),
    ]:
        status = merge_cli.main(
            ["peft", *map(str, dirs), "--grams", *map(str, files), "--rank", "2", "-o", str(target)]
        )
        err = capsys.readouterr().err
        assert status == 1 and re.search(message, err) and len(err.strip().splitlines()) == 1, err
    status = merge_cli.main(
        [
            "grams",
            "--adapter",
            str(dirs[0]),
            "--model",
            "nowhere:model",
            "--batches",
            "x:y",
            "-o",
            str(tmp_path / "missing" / "g.safetensors"),
        ]
    )
    err = capsys.readouterr().err
    assert status == 1 and "its folder" in err and "does not exist" in err  # before the model is even imported


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere: an unwritable folder cannot be made")
def test_unwritable_output_folder(clients, tmp_path):
    dirs, files, _, _ = clients
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(AdapterFileError, match="is not writable"):
        merge_lora_adapters(dirs, files, 2, output_dir=locked / "merged")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-iters", "0"], r"max_iters \(--max-iters\) must be a positive integer, got 0"),
        (["--tol", "-1"], r"tol \(--tol\) must be a finite number ≥ 0, got -1.0"),
        (["--workers", "0"], r"workers \(--workers\) must be a positive integer"),
        (["--device", "gpu"], r"device 'gpu' is not one torch knows"),
        (["--rank", "0"], "rank must be a positive integer, got 0"),
    ],
)
def test_bad_options_are_one_line_errors(clients, capsys, argv, message):
    dirs, files, _, _ = clients
    args = ["peft", *map(str, dirs), "--grams", *map(str, files), "--rank", "2", *argv]
    assert merge_cli.main(args) == 1
    err = capsys.readouterr().err
    assert re.search(message, err) and len(err.strip().splitlines()) == 1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error given where no GPU is present")
def test_cuda_without_a_gpu_is_a_clear_error(clients):
    dirs, files, _, _ = clients
    with pytest.raises(ValueError, match=r"device 'cuda': no CUDA GPU is available here"):
        merge_lora_adapters(dirs, files, 2, device="cuda")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lora_alpha": float("nan")}, r"lora_alpha must be a finite number in \(0, 1e\+06\], got nan"),
        ({"lora_alpha": float("inf")}, r"lora_alpha must be a finite number .*got inf"),
        ({"lora_alpha": 1e308}, r"lora_alpha must be a finite number .*got 1e\+308"),
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\] must be a positive integer, got 0"),
        ({"rank_pattern": {"q_proj": -2}}, r"rank_pattern\['q_proj'\] must be a positive integer, got -2"),
        ({"rank_pattern": {"q_proj": 2.5}}, r"rank_pattern\['q_proj'\] must be a positive integer, got 2.5"),
        ({"rank_pattern": {"q_proj": True}}, r"rank_pattern\['q_proj'\] must be a positive integer, got True"),
        ({"alpha_pattern": {"q_proj": float("nan")}}, r"alpha_pattern\['q_proj'\] must be a finite number"),
        ({"rank_pattern": {"(a+)+$": 4}}, r"rank_pattern key '\(a\+\)\+\$' nests repetitions"),
        ({"alpha_pattern": {"(ab|a)*q_proj": 4}}, r"alpha_pattern key .* nests repetitions"),
        ({"rank_pattern": {"(?:.*)*": 4}}, r"rank_pattern key .* nests repetitions"),
    ],
)
def test_bad_config_values_name_file_and_field(tmp_path, changes, message):
    write_adapter(tmp_path / "a", 3, seed=0, config=changes)
    with pytest.raises(AdapterFileError, match=message) as err:
        adapters.AdapterFile(tmp_path / "a")
    assert str(tmp_path / "a" / adapters.CONFIG_NAME) in str(err.value)


def test_a_pattern_too_costly_to_match_is_refused(tmp_path):
    """Without nesting, a pattern of many independent repetitions still has a bounded cost: over it, an error."""
    write_adapter(tmp_path / "a", 3, seed=0, config={"alpha_pattern": {".*" * 6 + "x": 4}})
    with pytest.raises(AdapterFileError, match="too many repetitions and alternatives to match"):
        adapters.AdapterFile(tmp_path / "a")


def test_pattern_matching_is_peft_s():
    """Bounded matching agrees with PEFT's own get_pattern_key on names and patterns of every shape it allows."""
    peft_other = pytest.importorskip("peft.utils.other")
    names = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.10.self_attn.q_proj",
        "layers.1.mlp.down_proj",
        "q_proj",
        "xq_proj",
        "model.layers.0.self_attn.q_proj.base",
        "a.b",
    ]
    patterns = [
        "q_proj",
        "self_attn.q_proj",
        r"layers\.1\d*\.",
        r"layers\.\d+\.self_attn\.q_proj",
        r"^q_proj",
        "mlp.*",
        "(q|k)_proj",
        r"(?<=self_attn\.)q_proj",
        r"layers\.0\..*",
        "b",
        r"a\.b",
        "proj",
        ".*proj",
    ]
    for name in names:
        for pattern in patterns:
            ours = adapters._pattern_value({pattern: 1}, name, 0, "cfg", "rank_pattern")
            peft_says = peft_other.get_pattern_key([pattern], name) == pattern
            assert bool(ours) == peft_says, (pattern, name)
    ordered = {"q_proj": 2, "self_attn.q_proj": 3}  # the first pattern that matches wins, as in PEFT
    assert adapters._pattern_value(ordered, names[0], 0, "cfg", "rank_pattern") == 2


def test_bench_adapters_smoke(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "bench_adapters.py"),
        "--hidden",
        "32",
        "--ffn",
        "48",
        "--blocks",
        "1",
        "--clients",
        "3",
        "--rank",
        "2",
        "--full-gram-files",
        "2",
        "--peft-clients",
        "3",
        "--solver-rank-sums",
        "4",
        "--dir",
        str(tmp_path / "data"),
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert {row["grams"] for row in result["rows"]} == {"diagonal", "full"}
    for row in result["rows"]:
        assert row["adapters_per_s"] > 0 and row["peak_rss_mb"] > 0
        assert row["objective"]["lorm_exact"] <= row["objective"]["peft_svd"] * (1 + 1e-9), row
    for row in result["exact_solver"]:
        assert row["max_rel_diff"] < 1e-8, row


def test_bench_adapters_records_a_killed_peft_path_and_goes_on(tmp_path, monkeypatch, capsys):
    """A PEFT merge killed by a signal (the kernel's OOM killer does that) is a row's result, not the end of
    the run: here every PEFT child kills itself."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_adapters
    finally:
        sys.path.pop(0)
    kill_peft = "import json, os, signal, sys\nif json.loads(sys.argv[1])['path'].startswith('peft'):\n    os.kill(os.getpid(), signal.SIGKILL)\n"
    monkeypatch.setattr(bench_adapters, "CHILD", kill_peft + bench_adapters.CHILD)
    out = tmp_path / "bench.json"
    flags = ["--hidden", "32", "--ffn", "48", "--blocks", "1", "--full-blocks", "0", "--clients", "2", "--rank", "2",
             "--peft-clients", "2", "--solver-rank-sums", "--dir", str(tmp_path / "data"), "--out", str(out)]  # fmt: skip
    bench_adapters.main(flags)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["peft_svd_killed_by_signal"] == row["peft_cat_killed_by_signal"] == signal.SIGKILL
    assert "peft_svd_s" not in row and set(row["objective"]) == {"lorm_exact", "zero"}
    assert f"killed (signal {int(signal.SIGKILL)})" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--blocks", "--full-blocks"])
def test_bench_adapters_refuses_a_negative_block_count(tmp_path, flag):
    cmd = [sys.executable, str(ROOT / "bench" / "bench_adapters.py"), flag, "-1", "--out", str(tmp_path / "b.json")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--blocks and --full-blocks must be >= 0" in done.stderr
    assert not (tmp_path / "b.json").exists()
