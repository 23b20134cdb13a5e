"""GPU benchmark of the CUDA ops: Gram accumulation and the streaming merge, on ViT-B/16 shapes.

    python bench/bench_gpu.py --out bench/results/gpu.json

Every fused row is timed with each CUDA implementation (`--kernels`, default both): `custom`, the kernels of
csrc/cuda/, and `aten`, the ATen compositions that are the default (LORM_EXT_CUDA_KERNELS).
The JSON is rewritten after every row ("complete" turns true at the end), so a run cut short keeps what it
measured.

Ceilings are measured in the same run: a 1 GiB device-to-device copy (bandwidth, read + write) and large
torch.matmul in bfloat16, float32 (TF32 off) and float64 (FLOP/s). Every result is printed next to its
floor, the larger of (bytes it must move / copy bandwidth) and (FLOPs it must do / matmul rate).
Times are medians of CUDA-event timings after warm-up.

Gram accumulation (bf16 layer inputs, 3152 tokens = 16 images × 197, fp32 G): lorm_ext's kernel against the
authors' hook (upcast to fp32, then a full fp32 matmul), both errors against float64, and the rate on the
triangle's FLOPs as a fraction of the measured bf16 matmul rate. The last row puts all 48 ViT-B layer
inputs in one call (the reference loops over the layers).

Merge (48 ViT-B layers: 36 with 768 inputs, 12 with 3072; outputs 2304/768/3072/768; fp32 client Grams,
fp64 sums and solves), A-step and B-step, K clients, rank r:
- reduction: one client's ops.gram_weighted_accumulate_ / ops.projected_accumulate_ over all 48 layers;
  its bandwidth is the bytes the op must move (read G_k, read and write the fp64 sums) over its time.
- fused: the streaming merger, K clients one at a time (validation off) plus the batched solve.
- authors: fed-mammoth's per-layer server loop (bench_merge.authors_solve: clients stacked, torch.pinverse
  in float64), on one transformer block's 4 layers (every block has the same shapes) times 12.
- peak memory: torch.cuda.max_memory_allocated above the client data already on the GPU.
Client data comes from bench_merge.Clients; 4 distinct clients are made per configuration and client k
sends client k mod 4's tensors (every call still reads its Grams from memory: they exceed the L2 cache).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import VIT_B_LAYERS, Clients, authors_solve

from lorm_ext import AStepMerger, BStepMerger, ops

TOKENS = 3152  # a batch of 16 images × 197 tokens of ViT-B/16
DISTINCT_CLIENTS = 4
LAYERS_PER_BLOCK = 4


# ------------------------------------------------------------------------------------------ formatting


def markdown_table(columns: list[tuple[str, str, str]], rows: list[dict]) -> str:
    """columns: (header, key, format spec); a missing value prints as '-'."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [format(row[key], spec) if row.get(key) is not None else "-" for _, key, spec in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


GRAM_COLUMNS = [
    ("case", "case", "s"),
    ("width", "width", "s"),
    ("kernels", "kernels", "s"),
    ("fused ms", "fused_ms", ".3f"),
    ("floor ms", "floor_ms", ".3f"),
    ("reference ms", "reference_ms", ".3f"),
    ("speedup", "speedup", ".2f"),
    ("fraction of bf16 matmul rate", "fraction_of_bf16_rate", ".2f"),
    ("fused rel err", "fused_rel_err", ".1e"),
    ("reference rel err", "reference_rel_err", ".1e"),
]

MERGE_COLUMNS = [
    ("step", "step", "s"),
    ("Grams", "grams", "s"),
    ("K", "K", "d"),
    ("r", "r", "d"),
    ("kernels", "kernels", "s"),
    ("reduction ms/client", "reduction_ms", ".3f"),
    ("floor ms/client", "reduction_floor_ms", ".3f"),
    ("fraction of copy BW", "fraction_of_copy_bandwidth", ".2f"),
    ("fused s", "fused_s", ".4f"),
    ("floor s", "floor_s", ".4f"),
    ("authors s", "authors_s", ".2f"),
    ("× vs authors", "speedup_vs_authors", ".1f"),
    ("fused peak MB", "fused_peak_MB", ".0f"),
    ("authors peak MB", "authors_peak_MB", ".0f"),
    ("max rel diff", "max_rel_diff_vs_authors", ".1e"),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", nargs="+", default=["gram", "merge"], choices=["gram", "merge"])
    p.add_argument(
        "--kernels",
        nargs="+",
        default=["custom", "aten"],
        choices=["custom", "aten"],
        help="CUDA implementations to time (ops.use_cuda_kernels)",
    )
    p.add_argument("--gram-widths", type=int, nargs="+", default=[768, 3072])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 16])
    p.add_argument("--steps", nargs="+", default=["A", "B"], choices=["A", "B"])
    p.add_argument("--grams", nargs="+", default=["full", "diagonal"], choices=["full", "diagonal"])
    p.add_argument("--repeats", type=int, default=20, help="timed repeats of the fast paths (median reported)")
    p.add_argument("--slow-repeats", type=int, default=1, help="timed repeats of the authors' loop")
    p.add_argument("--no-authors", action="store_true", help="skip the authors' loop (it dominates the run time)")
    p.add_argument("--out", type=Path, default=Path("bench/results/gpu.json"))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------- measurement


def cuda_seconds(fn, repeats: int, warmup: int = 2) -> float:
    """Median seconds of fn() between two CUDA events on the current stream."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure(fn, repeats: int, warmup: int):
    """(median seconds, peak allocated bytes above the allocation at the start, last result) of fn()."""
    for _ in range(warmup):
        fn()
    times, peak, result = [], 0, None
    for _ in range(repeats):
        result = None  # free the previous result first
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
        peak = max(peak, torch.cuda.max_memory_allocated() - baseline)
    return statistics.median(times), peak, result


def copy_bandwidth_GBps() -> float:
    """A 1 GiB device-to-device copy: bytes read plus bytes written per second."""
    src = torch.ones(2**28, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / cuda_seconds(lambda: dst.copy_(src), repeats=10) / 1e9


def matmul_GFLOPs(dtype: torch.dtype, size: int) -> float:
    a = torch.randn(size, size, device="cuda").to(dtype)
    b = torch.randn(size, size, device="cuda").to(dtype)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return 2 * size**3 / cuda_seconds(lambda: a @ b, repeats=5) / 1e9
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def ceilings() -> dict:
    out = {"copy_GBps": copy_bandwidth_GBps()}
    for dtype, size in ((torch.bfloat16, 8192), (torch.float32, 8192), (torch.float64, 4096)):
        out[f"matmul_{str(dtype).removeprefix('torch.')}_GFLOPs"] = matmul_GFLOPs(dtype, size)
    return out


def rel_err(got: torch.Tensor, exact: torch.Tensor) -> float:
    return ((got.double() - exact).abs().max() / exact.abs().max()).item()


# ------------------------------------------------------------------------------------------------ Gram


def gram_floor_s(widths: list[int], ceil: dict) -> float:
    """Read X (bf16), read and write G (fp32); the triangle's FLOPs at the bf16 matmul rate."""
    bytes_ = sum(TOKENS * n * 2 + 2 * n * n * 4 for n in widths)
    flops = sum(TOKENS * n * (n + 1) for n in widths)
    return max(bytes_ / (ceil["copy_GBps"] * 1e9), flops / (ceil["matmul_bfloat16_GFLOPs"] * 1e9))


def gram_case(case: str, widths: list[int], kernels: str, ceil: dict, repeats: int, seed: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    xs = [torch.randn(TOKENS, n, device="cuda", generator=gen).to(torch.bfloat16) for n in widths]
    grams = [torch.zeros(n, n, device="cuda") for n in widths]
    refs = [torch.zeros(n, n, device="cuda") for n in widths]

    def reference():  # the authors' hook: upcast, then a full fp32 matmul, per layer
        for h, x in zip(refs, xs):
            xf = x.float()
            h += xf.T @ xf

    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with ops.use_cuda_kernels(kernels):
            fused_s = cuda_seconds(lambda: ops.gram_accumulate_(grams, xs), repeats)
            reference_s = cuda_seconds(reference, repeats)
            for g, h in zip(grams, refs):
                g.zero_()
                h.zero_()
            ops.gram_accumulate_(grams, xs)
            reference()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    exact = [x.double().T @ x.double() for x in xs]
    flops = sum(TOKENS * n * (n + 1) for n in widths)
    return {
        "case": case,
        "width": "+".join(str(n) for n in sorted(set(widths))) if len(widths) > 1 else str(widths[0]),
        "kernels": kernels,
        "pairs": len(widths),
        "fused_ms": fused_s * 1e3,
        "floor_ms": gram_floor_s(widths, ceil) * 1e3,
        "reference_ms": reference_s * 1e3,
        "speedup": reference_s / fused_s,
        "fraction_of_bf16_rate": flops / fused_s / 1e9 / ceil["matmul_bfloat16_GFLOPs"],
        "fused_rel_err": max(rel_err(g, e) for g, e in zip(grams, exact)),
        "reference_rel_err": max(rel_err(h, e) for h, e in zip(refs, exact)),
    }


def gram_rows(args, ceil: dict, rows: list[dict], save) -> None:
    cases = [("one layer", [n]) for n in args.gram_widths]
    cases.append(("48 ViT-B layers, one call", [n for _, _, n in VIT_B_LAYERS]))
    print("\n" + markdown_table(GRAM_COLUMNS, []), flush=True)
    for case, widths in cases:
        for kernels in args.kernels:
            rows.append(gram_case(case, widths, kernels, ceil, args.repeats, args.seed))
            print(markdown_table(GRAM_COLUMNS, rows[-1:]).splitlines()[-1], flush=True)
            save()


# ----------------------------------------------------------------------------------------------- merge


def reduction_bytes(r: int, step: str, diagonal: bool) -> float:
    """Bytes one client's reduction must move: read G_k (fp32) and the factors, read+write the fp64 sums."""
    total = 0.0
    for _, out, n in VIT_B_LAYERS:
        gram = n if diagonal else n * n
        if step == "A":  # G_k, A_k in; ΣG and Σ A_k G_k read and written
            total += 4 * gram + 4 * r * n + 16 * gram + 16 * r * n
        else:  # G_k, A, B_k in; Σ P_k and Σ B_k P_k read and written
            total += 4 * gram + 4 * r * n + 4 * out * r + 16 * r * r + 16 * out * r
    return total


def reduction_flops(r: int, step: str, diagonal: bool) -> float:
    total = 0.0
    for _, out, n in VIT_B_LAYERS:
        gram = n if diagonal else n * n
        total += 2 * r * gram + (2 * r * r * n + 2 * out * r * r if step == "B" else 0)
    return total


def solve_flops(r: int, step: str, diagonal: bool) -> float:
    """The final batched solve: Cholesky of ΣG (n³/3) and its two triangular solves, or the r × r system."""
    total = 0.0
    for _, out, n in VIT_B_LAYERS:
        if step == "A":
            total += r * n if diagonal else n**3 / 3 + 2 * r * n * n
        else:
            total += r**3 / 3 + 2 * out * r * r
    return total


def reduction_floor_s(r, step, diagonal, ceil) -> float:
    return max(
        reduction_bytes(r, step, diagonal) / (ceil["copy_GBps"] * 1e9),
        reduction_flops(r, step, diagonal) / (ceil["matmul_float64_GFLOPs"] * 1e9),
    )


def client_pool(r: int, diagonal: bool, seed: int):
    """DISTINCT_CLIENTS clients' (A_k, B_k, G_k) per layer on the GPU, and the server's A for B-steps."""
    clients = Clients(VIT_B_LAYERS, r, diagonal, seed)
    pool = [
        [tuple(t.cuda() for t in clients.layer(c, i)) for i in range(len(VIT_B_LAYERS))]
        for c in range(DISTINCT_CLIENTS)
    ]
    shared_a = {name: a.cuda() for name, a in clients.shared_a().items()}
    return pool, shared_a


def merge_row(step: str, kind: str, k: int, r: int, kernels: str, pool, shared_a, args, ceil: dict):
    """(the fused columns of one row, the merged factors), with the CUDA implementation `kernels`."""
    with ops.use_cuda_kernels(kernels):
        row, merged = _merge_row(step, kind, k, r, pool, shared_a, args, ceil)
    return {"kernels": kernels} | row, merged


def _merge_row(step: str, kind: str, k: int, r: int, pool, shared_a, args, ceil: dict):
    diagonal = kind == "diagonal"
    names = [name for name, _, _ in VIT_B_LAYERS]

    # One client's reduction over the 48 layers, straight through the op.
    dtype = torch.float64
    if step == "A":
        g_sums = [torch.zeros(g.shape, device="cuda", dtype=dtype) for _, _, g in pool[0]]
        w_sums = [torch.zeros(a.shape, device="cuda", dtype=dtype) for a, _, _ in pool[0]]
        grams, factors = [g for _, _, g in pool[0]], [a for a, _, _ in pool[0]]
        reduce = lambda: ops.gram_weighted_accumulate_(g_sums, w_sums, grams, factors)
    else:
        p_sums = [torch.zeros(r, r, device="cuda", dtype=dtype) for _ in names]
        w_sums = [torch.zeros(b.shape[0], r, device="cuda", dtype=dtype) for _, b, _ in pool[0]]
        grams, bs, shared = [g for _, _, g in pool[0]], [b for _, b, _ in pool[0]], [shared_a[n] for n in names]
        reduce = lambda: ops.projected_accumulate_(p_sums, w_sums, grams, shared, bs)
    reduction_s = cuda_seconds(reduce, args.repeats)
    bytes_ = reduction_bytes(r, step, diagonal)

    def fused():
        merger = (
            AStepMerger(validate=False, device="cuda")
            if step == "A"
            else BStepMerger(shared_a, validate=False, device="cuda")
        )
        for c in range(k):
            layer_data = pool[c % DISTINCT_CLIENTS]
            factors = {n: (a if step == "A" else b) for n, (a, b, _) in zip(names, layer_data)}
            merger.add_client(factors, {n: g for n, (_, _, g) in zip(names, layer_data)})
        return merger.merge()

    fused_s, fused_peak, merged = measure(fused, max(1, args.repeats // 4), warmup=1)
    row = {
        "step": step,
        "grams": kind,
        "K": k,
        "r": r,
        "reduction_ms": reduction_s * 1e3,
        "reduction_floor_ms": reduction_floor_s(r, step, diagonal, ceil) * 1e3,
        "reduction_GBps": bytes_ / reduction_s / 1e9,
        "fraction_of_copy_bandwidth": bytes_ / reduction_s / 1e9 / ceil["copy_GBps"],
        "fused_s": fused_s,
        "floor_s": k * reduction_floor_s(r, step, diagonal, ceil)
        + solve_flops(r, step, diagonal) / (ceil["matmul_float64_GFLOPs"] * 1e9),
        "fused_peak_MB": fused_peak / 2**20,
    }
    return row, merged


def authors_merge(step: str, kind: str, k: int, pool, shared_a, args):
    """(seconds for all 48 layers, peak bytes, merged factors of the timed block) of the authors'-style loop."""
    solve = authors_solve(step, kind == "diagonal")
    names = [name for name, _, _ in VIT_B_LAYERS]

    def authors():  # one transformer block: every block has the same shapes
        out = {}
        for i in range(LAYERS_PER_BLOCK):
            As, Bs, Gs = map(list, zip(*(pool[c % DISTINCT_CLIENTS][i] for c in range(k))))
            out[names[i]] = solve(As, Bs, Gs, shared_a.get(names[i]))
        return out

    block_s, peak, out = measure(authors, args.slow_repeats, warmup=0)
    return block_s * (len(VIT_B_LAYERS) // LAYERS_PER_BLOCK), peak, out


def merge_rows(args, ceil: dict, rows: list[dict], save) -> None:
    print("\n" + markdown_table(MERGE_COLUMNS, []), flush=True)
    for kind in args.grams:
        for r in args.ranks:
            pool, shared_a = client_pool(r, kind == "diagonal", args.seed)
            for step in args.steps:
                for k in args.clients:
                    authors = None if args.no_authors else authors_merge(step, kind, k, pool, shared_a, args)
                    for kernels in args.kernels:
                        row, merged = merge_row(step, kind, k, r, kernels, pool, shared_a, args, ceil)
                        if authors is not None:
                            authors_s, authors_peak, authors_out = authors
                            row.update(
                                {
                                    "authors_s": authors_s,
                                    "speedup_vs_authors": authors_s / row["fused_s"],
                                    "authors_peak_MB": authors_peak / 2**20,
                                    "max_rel_diff_vs_authors": max(
                                        ((merged[n] - authors_out[n]).abs().max() / authors_out[n].abs().max()).item()
                                        for n in authors_out
                                    ),
                                }
                            )
                        rows.append(row)
                        print(markdown_table(MERGE_COLUMNS, [row]).splitlines()[-1], flush=True)
                        save()
                    del authors
            del pool, shared_a
            torch.cuda.empty_cache()


def main(argv=None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU, and torch.cuda.is_available() is False on this machine")
    if not ops.compiled_with_cuda():
        sys.exit("bench_gpu.py needs lorm_ext built with its CUDA kernels (LORM_EXT_CUDA=1; see bench/README.md)")
    device = torch.cuda.get_device_name()
    ceil = ceilings()
    print(f"# {device}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    print("ceilings: " + ", ".join(f"{key} {value:.1f}" for key, value in ceil.items()))
    result = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]) if argv is None else " ".join(argv),
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "host": platform.node(),
        "ceilings": ceil,
        "complete": False,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        args.out.write_text(json.dumps(result, indent=2))

    if "gram" in args.sections:
        gram_rows(args, ceil, result.setdefault("gram_accumulation", []), save)
    if "merge" in args.sections:
        merge_rows(args, ceil, result.setdefault("merge", []), save)
    result["complete"] = True
    save()
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
