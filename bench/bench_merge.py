"""CPU benchmark: the fused LoRM merge against the reference and an authors'-style loop, on ViT-B/16 shapes.

    python bench/bench_merge.py --out bench/results/cpu.json

Three paths compute the same A-step or B-step for 48 ViT-B/16 layers (36 with 768 inputs, 12 with 3072;
outputs 2304/768/3072/768) and K clients:
- fused: lorm_ext's streaming mergers; clients arrive one at a time, one batched solve per layer shape; timed
  as users run them (every client's values checked before it is added) and with the value checks off.
- reference: lorm_ext.reference (the specification: all clients in lists, torch.pinverse in float64).
- authors: a per-layer loop in the style of fed-mammoth's LoRM server (clients stacked, torch.pinverse in
  float64, the B-step through out × in products, and α = 0 Grams kept as full diagonal matrices).
All K clients' Grams of ViT-B do not fit in this machine's memory at K = 50 (27 GB in float32), so the
reference and authors' paths get one layer's K clients at a time and the fused path one client at a time.
Times exclude making the inputs; they are medians of --repeats runs for the fused paths and of --slow-repeats
runs (default one: minutes each at K = 50) for the others. Each path's peak memory is the process's peak
resident set above what it held when the path started (Linux VmHWM, reset per path). Ceilings — copy bandwidth, float32/float64 matmul
rates — are measured in the same run, and each fused result is printed next to its floor: the larger of
(bytes it must move / copy bandwidth) and (FLOPs it must do / float64 matmul rate), per client, plus the
final solve's FLOPs. The fused results are also checked against the reference (max relative difference).
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
    for name, out, width in (("attn.qkv", 2304, 768), ("attn.proj", 768, 768), ("mlp.fc1", 3072, 768), ("mlp.fc2", 768, 3072))
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


def ceilings() -> dict:
    """Copy bandwidth and matmul rates of this machine, measured now."""
    src = torch.ones(64 * 2**20)  # 256 MiB of float32
    dst = torch.empty_like(src)
    copy = []
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        copy.append(time.perf_counter() - start)
    out = {"copy_GBps": 2 * src.numel() * 4 / statistics.median(copy) / 1e9}
    for dtype in (torch.float32, torch.float64):
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        rates = []
        for _ in range(5):
            start = time.perf_counter()
            a @ b
            rates.append(2 * 2048**3 / (time.perf_counter() - start) / 1e9)
        out[f"matmul_{str(dtype).removeprefix('torch.')}_GFLOPs"] = statistics.median(rates)
    return out


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
    reference_s: float
    authors_s: float
    floor_s: float
    speedup_vs_reference: float
    speedup_vs_authors: float
    fused_peak_MB: float
    reference_peak_MB: float
    authors_peak_MB: float
    max_rel_diff_vs_reference: float
    repeats_fused: int
    repeats_slow: int


def max_rel_diff(a: dict, b: dict) -> float:
    return max(((a[n] - b[n].to(a[n])).abs().max() / b[n].abs().max().clamp_min(1e-300)).item() for n in a)


def gram_rows(ceil, widths, repeats) -> list[dict]:
    """Gram accumulation of ViT-B/16 layer inputs (3152 tokens = 16 images × 197) into an fp32 G."""
    rows = []
    for width in widths:
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(3152, width).to(dtype)
            truth = ref.gram_ref(x, dtype=torch.float64)
            fused_t, ref_t = [], []
            for _ in range(repeats):
                g = torch.zeros(width, width)
                start = time.perf_counter()
                ops.gram_accumulate_([g], [x])
                fused_t.append(time.perf_counter() - start)
                h = torch.zeros(width, width)
                start = time.perf_counter()
                h += x.float().T @ x.float()  # the authors' hook: upcast, then a full fp32 matmul
                ref_t.append(time.perf_counter() - start)
            f, r_ = statistics.median(fused_t), statistics.median(ref_t)
            triangle_flops = width * (width + 1) * 3152
            scale = truth.abs().max().item()
            rows.append({
                "width": width, "input": str(dtype).removeprefix("torch."), "fused_s": f, "reference_s": r_,
                "speedup": r_ / f,
                "fused_fraction_of_fp32_matmul_rate": triangle_flops / f / 1e9 / ceil["matmul_float32_GFLOPs"],
                "fused_rel_err": (g.double() - truth).abs().max().item() / scale,
                "reference_rel_err": (h.double() - truth).abs().max().item() / scale,
            })
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 50])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 16])
    p.add_argument("--steps", nargs="+", default=["A", "B"], choices=["A", "B"])
    p.add_argument("--grams", nargs="+", default=["full", "diagonal"], choices=["full", "diagonal"])
    p.add_argument("--layers", type=int, default=len(VIT_B_LAYERS), help="use only the first N ViT-B layers")
    p.add_argument("--gram-widths", type=int, nargs="*", default=[768, 3072], help="Gram accumulation widths")
    p.add_argument("--repeats", type=int, default=3, help="repeats of the fused path (median reported)")
    p.add_argument("--slow-repeats", type=int, default=1, help="repeats of the reference and authors' paths")
    p.add_argument("--no-authors", action="store_true", help="skip the authors'-style loop (most of the run time)")
    p.add_argument("--out", type=Path, default=Path("bench/results/cpu.json"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 1 <= args.layers <= len(VIT_B_LAYERS):
        p.error(f"--layers must be in 1..{len(VIT_B_LAYERS)}")
    layers = VIT_B_LAYERS[: args.layers]

    ceil = ceilings()
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("ceilings: " + ", ".join(f"{k} {v:.1f}" for k, v in ceil.items()))
    grams = gram_rows(ceil, args.gram_widths, max(args.repeats, 3))
    print("\n| Gram width | input | fused s | reference s | speedup | fraction of fp32 matmul rate | fused rel err | reference rel err |")
    print("|---|---|---|---|---|---|---|---|")
    for g in grams:
        print(f"| {g['width']} | {g['input']} | {g['fused_s']:.4f} | {g['reference_s']:.4f} | {g['speedup']:.2f} | "
              f"{g['fused_fraction_of_fp32_matmul_rate']:.2f} | {g['fused_rel_err']:.1e} | {g['reference_rel_err']:.1e} |")

    rows = []
    print("\n| step | Grams | K | r | fused s | fused, no value checks s | floor s | reference s | authors s "
          "| × vs reference | × vs authors "
          "| fused peak MB | reference peak MB | authors peak MB | max rel diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for step in args.steps:
        for kind in args.grams:
            diagonal = kind == "diagonal"
            for k in args.clients:
                for r in args.ranks:
                    clients = Clients(layers, r, diagonal, args.seed)
                    f_s, f_mem, f_out = measure(lambda: fused(clients, k, step), args.repeats)
                    u_s, _, _ = measure(lambda: fused(clients, k, step, validate=False), args.repeats)
                    r_s, r_mem, r_out = measure(lambda: per_layer(clients, k, step, reference_solve(step)), args.slow_repeats)
                    a_s, a_mem = float("nan"), float("nan")
                    if not args.no_authors:
                        a_s, a_mem, _ = measure(
                            lambda: per_layer(clients, k, step, authors_solve(step, diagonal)), args.slow_repeats
                        )
                    row = Row(step, kind, k, r, f_s, u_s, r_s, a_s, fused_floor(layers, k, r, step, diagonal, ceil), r_s / f_s,
                              a_s / f_s, f_mem, r_mem, a_mem, max_rel_diff(f_out, r_out), args.repeats, args.slow_repeats)
                    rows.append(row)
                    print(f"| {step} | {kind} | {k} | {r} | {f_s:.3f} | {u_s:.3f} | {row.floor_s:.3f} | {r_s:.3f} | {a_s:.2f} | "
                          f"{row.speedup_vs_reference:.2f} | {row.speedup_vs_authors:.1f} | {f_mem:.0f} | {r_mem:.0f} | "
                          f"{a_mem:.0f} | {row.max_rel_diff_vs_reference:.1e} |", flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]) if argv is None else argv,
        "machine": {"processor": platform.processor(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "ceilings": ceil, "gram_accumulation": grams,
        "merge": [{k: None if v != v else v for k, v in asdict(r).items()} for r in rows],  # NaN (skipped) -> null
    }, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
