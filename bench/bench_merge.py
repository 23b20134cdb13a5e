"""CPU benchmark: the fused ops and merges against plain PyTorch, the reference and an authors'-style loop.

    python bench/bench_merge.py --out bench/results/cpu.json

Four tables, every fused path next to the plain PyTorch a competent user would write for the same result and
next to its floor on this machine (ceilings — copy bandwidth, float32/float64 matmul rates — measured in the
same run, per thread count):
- Gram accumulation (3152 tokens = 16 images × 197): fused against `G.addmm_(Xᵀ, X)` (fp32 X; for 16-bit X
  the authors' hook, upcast then the same matmul), at each thread count of --threads.
- Value checks (`gram_stats`) against the torch ops that check the same (finite, symmetric, diagonal range).
- The batched PSD solve against `torch.linalg.cholesky` + `torch.cholesky_solve`.
- Merges: the A-step or B-step for ViT-B/16 layers (36 with 768 inputs, 12 with 3072; outputs
  2304/768/3072/768; --layers takes the first N) and K clients, by
  fused: lorm_ext's streaming mergers; clients arrive one at a time, one batched solve per layer shape; timed
    as users run them (every client's values checked before it is added) and with the value checks off;
  plain: the same streaming sums written with torch ops (upcast, add, addmm), then a Cholesky solve;
  reference: lorm_ext.reference (the specification: all clients in lists, torch.pinverse in float64);
  authors: a per-layer loop in the style of fed-mammoth's LoRM server (clients stacked, torch.pinverse in
    float64, the B-step through out × in products, and α = 0 Grams kept as full diagonal matrices).
All K clients' Grams of ViT-B do not fit in this machine's memory at K = 50 (27 GB in float32), so the
reference and authors' paths get one layer's K clients at a time and the streaming paths one client at a time.
Times exclude making the inputs; they are medians of --repeats runs (fused and plain interleaved) and of
--slow-repeats runs for the others. Peak memory is the process's peak resident set above what it held when
the path started (Linux VmHWM, reset per path). Floors: the larger of (bytes it must move / copy bandwidth)
and (FLOPs it must do / float64 matmul rate), per client, plus the final solve's FLOPs. The fused results are
checked against the reference (max relative difference). The machine (CPU model, ISA, threads) is printed and
written to the JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lorm_ext import AStepMerger, BStepMerger, ops
from lorm_ext import reference as ref

# (name, out, in) of the LoRA layers of ViT-B/16.
VIT_B_LAYERS = [
    (f"blocks.{i}.{name}", out, width)
    for i in range(12)
    for name, out, width in (
        ("attn.qkv", 2304, 768),
        ("attn.proj", 768, 768),
        ("mlp.fc1", 3072, 768),
        ("mlp.fc2", 768, 3072),
    )
]


# ----------------------------------------------------------------------------------------------- inputs


class Clients:
    """Deterministic synthetic clients: per (client, layer) a LoRA factor pair and a PSD Gram.

    G = c · S + diag(d) with S one random Gram per width (made once), c and d drawn per client and layer:
    cheap to make (O(in²)), different per client, and positive definite like a Gram of many tokens.
    """

    def __init__(self, layers, r: int, diagonal: bool, seed: int):
        self.layers, self.r, self.diagonal, self.seed = layers, r, diagonal, seed
        gen = torch.Generator().manual_seed(seed)
        self.base = {}
        for width in sorted({w for _, _, w in layers}):
            x = torch.randn(width + 64, width, generator=gen)
            self.base[width] = (x.T @ x) / width

    def generator(self, client: int, layer: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + client * 1009 + layer)

    def layer(self, client: int, index: int):
        """(A_k, B_k, G_k) of one client and layer, in float32 as clients send them."""
        _, out, width = self.layers[index]
        gen = self.generator(client, index)
        scale = 0.5 + torch.rand((), generator=gen)
        spread = 0.1 + torch.rand(width, generator=gen)
        a = torch.randn(self.r, width, generator=gen) / width**0.5
        b = torch.randn(out, self.r, generator=gen) / self.r**0.5
        if self.diagonal:
            gram = scale * torch.diagonal(self.base[width]) + spread
        else:
            gram = scale * self.base[width]
            gram.diagonal().add_(spread)
        return a, b, gram

    def shared_a(self) -> dict[str, torch.Tensor]:
        """The server's A for a B-step (client -1's A)."""
        return {name: self.layer(-1, i)[0] for i, (name, _, _) in enumerate(self.layers)}


# ------------------------------------------------------------------------------------------------ paths


def fused(clients: Clients, k: int, step: str, validate: bool = True) -> tuple[float, dict]:
    """The streaming mergers as users run them: by default every client's values are checked (finite,
    symmetric Grams) before it is added, which the reference and authors' paths do not do."""
    names = [name for name, _, _ in clients.layers]
    merger = AStepMerger(validate=validate) if step == "A" else BStepMerger(clients.shared_a(), validate=validate)
    seconds = 0.0
    for c in range(k):
        a, b, g = zip(*(clients.layer(c, i) for i in range(len(names))))
        start = time.perf_counter()
        if step == "A":
            merger.add_client(dict(zip(names, a)), dict(zip(names, g)))
        else:
            merger.add_client(dict(zip(names, b)), dict(zip(names, g)))
        seconds += time.perf_counter() - start
        del a, b, g
    start = time.perf_counter()
    merged = merger.merge()
    return seconds + time.perf_counter() - start, merged


def per_layer(clients: Clients, k: int, step: str, solve) -> tuple[float, dict]:
    """Runs solve(As, Bs, Gs, shared_a) on one layer's K clients at a time; times only the solves."""
    shared = clients.shared_a() if step == "B" else {}
    seconds, merged = 0.0, {}
    for i, (name, _, _) in enumerate(clients.layers):
        As, Bs, Gs = map(list, zip(*(clients.layer(c, i) for c in range(k))))
        start = time.perf_counter()
        merged[name] = solve(As, Bs, Gs, shared.get(name))
        seconds += time.perf_counter() - start
        del As, Bs, Gs
    return seconds, merged


def plain(clients: Clients, k: int, step: str) -> tuple[float, dict]:
    """What a competent user writes with torch ops: the same streaming sums (upcast, add, addmm) one client at a
    time, then one Cholesky solve per layer (a diagonal Gram divides)."""
    names = [name for name, _, _ in clients.layers]
    shared = {n: a.double() for n, a in clients.shared_a().items()} if step == "B" else {}
    denominators, numerators, seconds = {}, {}, 0.0
    for c in range(k):
        layers = [clients.layer(c, i) for i in range(len(names))]
        start = time.perf_counter()
        for name, (a, b, g) in zip(names, layers):
            g = g.double()
            if step == "A":
                product = a.double() * g if clients.diagonal else a.double() @ g
                denominator = g
            else:
                A = shared[name]
                denominator = (A * g) @ A.T if clients.diagonal else A @ g @ A.T
                product = b.double() @ denominator
            if name in denominators:
                denominators[name] += denominator
                numerators[name] += product
            else:
                denominators[name], numerators[name] = denominator.clone(), product
        seconds += time.perf_counter() - start
        del layers
    start = time.perf_counter()
    merged = {}
    for name in names:
        denominator, numerator = denominators[name], numerators[name]
        if denominator.dim() == 1:
            merged[name] = numerator / denominator
        else:
            merged[name] = torch.cholesky_solve(numerator.T, torch.linalg.cholesky(denominator)).T
    return seconds + time.perf_counter() - start, merged


def reference_solve(step):
    if step == "A":
        return lambda As, Bs, Gs, shared_a: ref.a_step_ref(As, Gs)
    return lambda As, Bs, Gs, shared_a: ref.b_step_ref(Bs, shared_a, Gs)


def authors_solve(step, diagonal):
    """fed-mammoth's server loop for one layer: stack, sum, torch.pinverse in float64."""
    dtype = torch.float64

    def as_matrix(g):  # their α = 0 Grams stay full n × n matrices with a zero off-diagonal
        return torch.diag(g) if diagonal else g

    def a_step(As, Bs, Gs, shared_a):
        E = torch.stack([a.to(dtype) @ as_matrix(g).to(dtype) for a, g in zip(As, Gs)]).sum(0)
        G = torch.stack([as_matrix(g).to(dtype) for g in Gs]).sum(0)
        return E @ torch.pinverse(G)

    def b_step(As, Bs, Gs, shared_a):
        A = shared_a.to(dtype)
        E2 = torch.stack([(b.to(dtype) @ A) @ as_matrix(g).to(dtype) for b, g in zip(Bs, Gs)]).sum(0)
        G_inv = torch.pinverse(A @ torch.stack([as_matrix(g).to(dtype) for g in Gs]).sum(0) @ A.T)
        return E2 @ A.T @ G_inv

    return a_step if step == "A" else b_step


# ------------------------------------------------------------------------------------------ measurement


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(fn, repeats: int):
    """Median seconds over repeats, the peak resident memory above the starting point, the last result."""
    times, peaks, result = [], [], None
    for _ in range(repeats):
        result = None  # free the previous result before measuring again
        reset_peak_rss()
        baseline = current_rss_mb()
        seconds, result = fn()
        times.append(seconds)
        peaks.append(peak_rss_mb() - baseline)
    return statistics.median(times), max(peaks), result


def ceilings(earlier: dict | None = None) -> dict:
    """Copy bandwidth (bytes read + written), read bandwidth (one read stream: a max over the array) and matmul
    rates of this machine at the current thread count, measured now: the best of five tries each (a ceiling is
    what the machine can reach; on a shared machine a median is pulled down by other jobs), and at least the
    rates of ``earlier`` (the same ceilings measured before in the run)."""
    src = torch.ones(64 * 2**20)  # 256 MiB of float32
    dst = torch.empty_like(src)
    copy, read = [], []
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        copy.append(time.perf_counter() - start)
        start = time.perf_counter()
        src.amax()
        read.append(time.perf_counter() - start)
    out = {
        "copy_GBps": 2 * src.numel() * 4 / min(copy) / 1e9,
        "read_GBps": src.numel() * 4 / min(read) / 1e9,
    }
    for dtype in (torch.float32, torch.float64):
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        rates = []
        for _ in range(5):
            start = time.perf_counter()
            a @ b
            rates.append(2 * 2048**3 / (time.perf_counter() - start) / 1e9)
        out[f"matmul_{str(dtype).removeprefix('torch.')}_GFLOPs"] = max(rates)
    return {k: max(v, (earlier or {}).get(k, 0.0)) for k, v in out.items()}


def machine() -> dict:
    """The CPU model, its widest vector ISA, the ATen CPU capability in use and the thread count."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "other"
    return {
        "cpu": model,
        "isa": isa,
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def interleaved(paths: dict, repeats: int) -> dict:
    """Median seconds of each zero-argument path, the paths run in turn in every repeat (noise hits all alike)."""
    times = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def fused_floor(layers, k, r, step, diagonal, ceil) -> float:
    """Seconds the fused merge cannot beat on this machine: traffic or FLOPs per client, plus the solve."""
    bandwidth, rate = ceil["copy_GBps"] * 1e9, ceil["matmul_float64_GFLOPs"] * 1e9
    per_client_bytes = per_client_flops = solve_flops = 0.0
    for _, out, n in layers:
        gram = n if diagonal else n * n
        if step == "A":  # read G_k (fp32); read+write ΣG (fp64); A_k G_k into an r × n fp64 sum
            per_client_bytes += gram * 4 + gram * 16
            per_client_flops += 2 * r * gram
            solve_flops += (n**3 / 3 + 2 * r * n * n) if not diagonal else r * n
        else:  # read G_k; P_k = (A G_k) Aᵀ; the r × r solve is negligible
            per_client_bytes += gram * 4
            per_client_flops += 2 * r * gram + 2 * r * r * n + 2 * out * r * r
    return k * max(per_client_bytes / bandwidth, per_client_flops / rate) + solve_flops / rate


@dataclass
class Row:
    step: str
    grams: str
    K: int
    r: int
    fused_s: float
    fused_unchecked_s: float
    plain_s: float
    reference_s: float
    authors_s: float
    floor_s: float
    fused_over_floor: float
    speedup_vs_plain: float
    speedup_vs_reference: float
    speedup_vs_authors: float
    fused_peak_MB: float
    plain_peak_MB: float
    reference_peak_MB: float
    authors_peak_MB: float
    max_rel_diff_vs_reference: float
    repeats_fused: int
    repeats_slow: int


def max_rel_diff(a: dict, b: dict) -> float:
    return max(((a[n] - b[n].to(a[n])).abs().max() / b[n].abs().max().clamp_min(1e-300)).item() for n in a)


TOKENS = 3152  # 16 images × 197 tokens of ViT-B/16


# Each fraction a row reports: (its fused rate, the ceiling it is a fraction of).
FRACTIONS = {
    "fused_fraction_of_fp32_matmul_rate": ("fused_GFLOPs", "matmul_float32_GFLOPs"),
    "fused_fraction_of_copy_bandwidth": ("fused_GBps", "copy_GBps"),
    "fused_fraction_of_read_bandwidth": ("fused_GBps", "read_GBps"),
    "fused_fraction_of_fp64_matmul_rate": ("fused_GFLOPs", "matmul_float64_GFLOPs"),
}


def with_fractions(rows: list[dict], ceil: dict, fractions: list[str]) -> list[dict]:
    """The rows with the named fractions of their fused rate added, against the ceilings ``ceil``."""
    for row in rows:
        for fraction in fractions:
            rate, ceiling = FRACTIONS[fraction]
            row[fraction] = row[rate] / ceil[ceiling]
    return rows


def gram_rows(widths, repeats) -> list[dict]:
    """Gram accumulation of ViT-B/16 layer inputs into an fp32 G: fused against plain torch, interleaved."""
    rows = []
    for width in widths:
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(TOKENS, width).to(dtype)
            truth = ref.gram_ref(x, dtype=torch.float64)
            g, h = torch.zeros(width, width), torch.zeros(width, width)
            # plain: G.addmm_(Xᵀ, X) for fp32 X; a 16-bit X upcast first (the authors' hook does exactly this)
            xt = (lambda: x.T) if dtype == torch.float32 else (lambda: x.float().T)
            xs = (lambda: x) if dtype == torch.float32 else (lambda: x.float())
            times = interleaved(
                {"fused": lambda: ops.gram_accumulate_([g], [x]), "plain": lambda: h.addmm_(xt(), xs())}, repeats
            )
            g.zero_(), h.zero_()
            ops.gram_accumulate_([g], [x])
            h.addmm_(xt(), xs())
            triangle_flops = width * (width + 1) * TOKENS
            scale = truth.abs().max().item()
            rows.append(
                {
                    "threads": torch.get_num_threads(),
                    "width": width,
                    "input": str(dtype).removeprefix("torch."),
                    "fused_s": times["fused"],
                    "plain_s": times["plain"],
                    "speedup_vs_plain": times["plain"] / times["fused"],
                    "fused_GFLOPs": triangle_flops / times["fused"] / 1e9,
                    "fused_rel_err": (g.double() - truth).abs().max().item() / scale,
                    "plain_rel_err": (h.double() - truth).abs().max().item() / scale,
                }
            )
    return rows


def block_grams(layers, dtype) -> list[torch.Tensor]:
    """One positive definite Gram per layer of the given widths (the merge's client Grams, or their sums)."""
    out = []
    for _, _, width in layers:
        x = torch.randn(width + 64, width, dtype=torch.float64)
        out.append(((x.T @ x) / width).to(dtype))
    return out


def stats_rows(layers, repeats) -> list[dict]:
    """Value checks of one client's fp32 Grams: gram_stats against the torch ops a user would check them with."""
    grams = block_grams(layers, torch.float32)

    def plain():
        for g in grams:
            torch.isfinite(g).all().item(), (g - g.T).abs().max().item(), g.diagonal().aminmax()

    times = interleaved({"fused": lambda: ops.gram_stats(grams), "plain": plain}, repeats)
    gb = sum(g.numel() * g.element_size() for g in grams) / 1e9
    return [
        {
            "threads": torch.get_num_threads(),
            "grams": len(grams),
            "GB": gb,
            "fused_s": times["fused"],
            "plain_s": times["plain"],
            "speedup_vs_plain": times["plain"] / times["fused"],
            "fused_GBps": gb / times["fused"],
        }
    ]


def solve_rows(layers, r, repeats) -> list[dict]:
    """The A-step's final solve (r rows per layer) on fp64 sums: psd_right_solve against torch's Cholesky."""
    rows = []
    for width in sorted({w for _, _, w in layers}):
        count = sum(1 for _, _, w in layers if w == width)
        grams = torch.stack(block_grams([layer for layer in layers if layer[2] == width], torch.float64))
        rhs = torch.randn(count, r, width, dtype=torch.float64)
        plain = lambda: torch.cholesky_solve(rhs.mT, torch.linalg.cholesky(grams)).mT  # noqa: E731
        times = interleaved({"fused": lambda: ops.psd_right_solve(rhs, grams), "plain": plain}, repeats)
        flops = count * (width**3 / 3 + 2 * r * width * width)
        rows.append(
            {
                "threads": torch.get_num_threads(),
                "width": width,
                "layers": count,
                "r": r,
                "fused_s": times["fused"],
                "plain_s": times["plain"],
                "speedup_vs_plain": times["plain"] / times["fused"],
                "fused_GFLOPs": flops / times["fused"] / 1e9,
                "max_rel_diff": ((ops.psd_right_solve(rhs, grams) - plain()).abs().max() / plain().abs().max()).item(),
            }
        )
    return rows


def table(rows: list[dict], columns: dict) -> str:
    """A markdown table of the given {key: header} columns."""

    def cell(v):
        return "–" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[k]) for k in columns) + " |" for row in rows]
    return "\n".join(lines)


def merge_rows(args, layers, ceil) -> list[Row]:
    rows = []
    for step in args.steps:
        for kind in args.grams:
            diagonal = kind == "diagonal"
            for k in args.clients:
                for r in args.ranks:
                    clients = Clients(layers, r, diagonal, args.seed)
                    f_s, u_s, p_s, f_mem, p_mem = [], [], [], 0.0, 0.0
                    for _ in range(args.repeats):  # the streaming paths interleaved
                        t, m, f_out = measure(lambda: fused(clients, k, step), 1)
                        f_s.append(t)
                        f_mem = max(f_mem, m)
                        u_s.append(measure(lambda: fused(clients, k, step, validate=False), 1)[0])
                        t, m, _ = measure(lambda: plain(clients, k, step), 1)
                        p_s.append(t)
                        p_mem = max(p_mem, m)
                    f_s, u_s, p_s = map(statistics.median, (f_s, u_s, p_s))
                    r_s, r_mem, r_out = float("nan"), float("nan"), None
                    if not args.no_reference:
                        r_s, r_mem, r_out = measure(
                            lambda: per_layer(clients, k, step, reference_solve(step)), args.slow_repeats
                        )
                    a_s, a_mem = float("nan"), float("nan")
                    if not args.no_authors:
                        a_s, a_mem, _ = measure(
                            lambda: per_layer(clients, k, step, authors_solve(step, diagonal)), args.slow_repeats
                        )
                    floor = fused_floor(layers, k, r, step, diagonal, ceil)
                    diff = max_rel_diff(f_out, r_out) if r_out is not None else float("nan")
                    rows.append(
                        Row(
                            step,
                            kind,
                            k,
                            r,
                            f_s,
                            u_s,
                            p_s,
                            r_s,
                            a_s,
                            floor,
                            f_s / floor,
                            p_s / f_s,
                            r_s / f_s,
                            a_s / f_s,
                            f_mem,
                            p_mem,
                            r_mem,
                            a_mem,
                            diff,
                            args.repeats,
                            args.slow_repeats,
                        )
                    )
                    print(table([asdict(rows[-1])], MERGE_COLUMNS).splitlines()[-1], flush=True)
    return rows


MERGE_COLUMNS = {
    "step": "step",
    "grams": "Grams",
    "K": "K",
    "r": "r",
    "fused_s": "fused s",
    "fused_unchecked_s": "fused, no value checks s",
    "plain_s": "plain s",
    "floor_s": "floor s",
    "fused_over_floor": "fused / floor",
    "speedup_vs_plain": "× vs plain",
    "reference_s": "reference s",
    "authors_s": "authors s",
    "speedup_vs_reference": "× vs reference",
    "speedup_vs_authors": "× vs authors",
    "fused_peak_MB": "fused peak MB",
    "plain_peak_MB": "plain peak MB",
    "reference_peak_MB": "reference peak MB",
    "max_rel_diff_vs_reference": "max rel diff",
}


def nan_to_none(d: dict) -> dict:
    return {k: None if isinstance(v, float) and v != v else v for k, v in d.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 50])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 16])
    p.add_argument("--steps", nargs="+", default=["A", "B"], choices=["A", "B"])
    p.add_argument("--grams", nargs="+", default=["full", "diagonal"], choices=["full", "diagonal"])
    p.add_argument("--layers", type=int, default=len(VIT_B_LAYERS), help="use only the first N ViT-B layers")
    p.add_argument("--gram-widths", type=int, nargs="*", default=[64, 768, 3072], help="Gram accumulation widths")
    p.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[torch.get_num_threads()],
        help="thread counts of the op tables (Gram accumulation, value checks, solve)",
    )
    p.add_argument("--repeats", type=int, default=3, help="repeats of the fused and plain paths (median reported)")
    p.add_argument("--slow-repeats", type=int, default=1, help="repeats of the reference and authors' paths")
    p.add_argument("--no-reference", action="store_true", help="skip the reference (its rel diff is then not checked)")
    p.add_argument("--no-authors", action="store_true", help="skip the authors'-style loop (most of the run time)")
    p.add_argument("--out", type=Path, default=Path("bench/results/cpu.json"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 1 <= args.layers <= len(VIT_B_LAYERS):
        p.error(f"--layers must be in 1..{len(VIT_B_LAYERS)}")
    if any(t < 1 for t in args.threads):
        p.error("--threads must be positive")
    layers = VIT_B_LAYERS[: args.layers]
    threads_at_start = torch.get_num_threads()
    info = machine()
    print(f"# {info['cpu']} ({info['isa']}, ATen {info['aten_cpu_capability']}), torch {info['torch']}")

    ceils, grams, stats, solves = {}, [], [], []
    for threads in args.threads:
        torch.set_num_threads(threads)
        # Ceilings before and after this thread count's rows, the better of the two for each, so that a slow
        # moment at the start does not make the fused ops look closer to the machine's limits than they are.
        first = ceilings()
        block = (
            gram_rows(args.gram_widths, max(args.repeats, 5)),
            stats_rows(layers[:4], max(args.repeats, 5)),
            solve_rows(layers[:4], max(args.ranks), max(args.repeats, 3)),
        )
        ceil = ceils[threads] = ceilings(first)
        grams += with_fractions(block[0], ceil, ["fused_fraction_of_fp32_matmul_rate"])
        stats += with_fractions(
            block[1], ceil, ["fused_fraction_of_copy_bandwidth", "fused_fraction_of_read_bandwidth"]
        )
        solves += with_fractions(block[2], ceil, ["fused_fraction_of_fp64_matmul_rate"])
        print(f"\n## {threads} thread(s): " + ", ".join(f"{k} {v:.1f}" for k, v in ceil.items()))
    print(
        "\n"
        + table(
            grams,
            {
                "threads": "threads",
                "width": "width",
                "input": "input",
                "fused_s": "fused s",
                "plain_s": "plain s",
                "speedup_vs_plain": "× vs plain",
                "fused_fraction_of_fp32_matmul_rate": "fraction of fp32 matmul rate",
                "fused_rel_err": "fused rel err",
                "plain_rel_err": "plain rel err",
            },
        )
    )
    print(
        "\n"
        + table(
            stats,
            {
                "threads": "threads",
                "grams": "Grams",
                "GB": "GB",
                "fused_s": "fused s",
                "plain_s": "plain s",
                "speedup_vs_plain": "× vs plain",
                "fused_GBps": "fused GB/s",
                "fused_fraction_of_copy_bandwidth": "fraction of copy bandwidth",
                "fused_fraction_of_read_bandwidth": "fraction of read bandwidth",
            },
        )
    )
    print(
        "\n"
        + table(
            solves,
            {
                "threads": "threads",
                "width": "width",
                "layers": "layers",
                "r": "r",
                "fused_s": "fused s",
                "plain_s": "plain s",
                "speedup_vs_plain": "× vs plain",
                "fused_fraction_of_fp64_matmul_rate": "fraction of fp64 matmul rate",
                "max_rel_diff": "max rel diff",
            },
        )
    )

    torch.set_num_threads(threads_at_start)
    ceil = ceils.get(threads_at_start) or ceilings()
    print(f"\n## merges, {threads_at_start} thread(s), {len(layers)} layers")
    print("\n".join(table([], MERGE_COLUMNS).splitlines()[:2]))
    rows = merge_rows(args, layers, ceil)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]) if argv is None else argv,
                "machine": info,
                "ceilings_by_threads": ceils,
                "gram_accumulation": grams,
                "value_checks": stats,
                "solve": solves,
                "merge": [nan_to_none(asdict(r)) for r in rows],  # NaN (skipped) -> null
            },
            indent=2,
        )
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
