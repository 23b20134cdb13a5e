"""Adapter merging at LLM scale: the streamed LoRM merge (lorm-merge) against this machine's disk read rate and
copy bandwidth, measured in the same run, and against PEFT's add_weighted_adapter (svd and cat).

    python bench/bench_adapters.py --out bench/results/adapters.json

Generated PEFT LoRA adapters of a LLaMA-like layout (per block q/k/v/o hidden × hidden, gate/up ffn × hidden,
down hidden × ffn; default the 7B shapes 4096 / 11008, r = 16, float32 as PEFT saves them), N adapters each with
a Gram file: diagonal Grams (float32, one per client) on ``--blocks`` blocks, and full Grams stored as bfloat16
upper triangles on ``--full-blocks`` blocks. Full Grams of these widths are 171 MB per block and client, so
``--full-gram-files`` distinct files are written and client k uses file k mod that number (they are read again,
partly from the page cache: say so with the numbers). One merge costs the same per block, so 32 blocks take
32 / blocks times as long with the same peak memory (one module group's sums, not the model's).

Each path runs in a fresh process after every input file was dropped from the page cache
(posix_fadvise DONTNEED): the time, the peak resident set (VmHWM) and the peak anonymous memory (RssAnon,
sampled: memory-mapped file pages left out), and for LoRM the bytes of its inputs. The objective
Σ_k ‖X_k (ΔW − ΔW_k)ᵀ‖² of each result is computed from the same Grams (lorm-merge's --score). A last table
times the exact rank-r solve on one module's sums: lorm_ext's (Cholesky, SVD of a range sketch when Σ r_k is
small) against ten lines of plain torch (Cholesky, triangular solves, full SVD) and the eigendecomposition.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import ceilings  # noqa: E402  (one owner for the copy bandwidth and matmul rates)

from lorm_ext import adapters  # noqa: E402
from lorm_ext.merge import low_rank_exact  # noqa: E402


def machine() -> dict:
    """CPU model, vector ISA, threads: where the numbers come from."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.*)", info)
    flags_line = re.search(r"flags\s*:\s*(.*)", info)
    flags = set(flags_line.group(1).split()) if flags_line else set()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return {
        "cpu": model.group(1) if model else platform.processor(),
        "isa": isa,
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
    }


def llama_layout(hidden: int, ffn: int, blocks: int) -> dict[str, tuple[int, int]]:
    """{module: (out, in)} of the LoRA targets of a LLaMA-like model."""
    layout = {}
    for b in range(blocks):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            layout[f"model.layers.{b}.self_attn.{name}"] = (hidden, hidden)
        layout[f"model.layers.{b}.mlp.gate_proj"] = (ffn, hidden)
        layout[f"model.layers.{b}.mlp.up_proj"] = (ffn, hidden)
        layout[f"model.layers.{b}.mlp.down_proj"] = (hidden, ffn)
    return layout


def input_of(module: str) -> str:
    """q/k/v read one input (the first of them names it), gate/up another."""
    block, _, name = module.rpartition(".")
    return {"q_proj": f"{block}.k_proj", "v_proj": f"{block}.k_proj", "up_proj": f"{block}.gate_proj"}.get(name, module)


def write_adapters(root: Path, layout, rank: int, count: int) -> list[Path]:
    dirs = []
    for k in range(count):
        d = root / f"adapter{k}"
        dirs.append(d)
        if (d / adapters.CONFIG_NAME).exists():
            continue
        d.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(k)
        tensors = {}
        for module, (out, width) in layout.items():
            key_b, key_a = adapters.factor_keys(module)
            tensors[key_a] = torch.randn(rank, width, generator=g) / width**0.5
            tensors[key_b] = torch.randn(out, rank, generator=g) * 0.01
        save_file(tensors, d / adapters.WEIGHTS_NAME, metadata={"format": "pt"})
        config = {
            "peft_type": "LORA",
            "r": rank,
            "lora_alpha": 2 * rank,
            "task_type": None,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            "base_model_name_or_path": "bench/llama-like",
            "lora_dropout": 0.0,
            "bias": "none",
        }
        (d / adapters.CONFIG_NAME).write_text(json.dumps(config))
    return dirs


def write_grams(root: Path, layout, count: int, diagonal: bool) -> list[Path]:
    """``count`` Gram files: random positive diagonals, or G = diag(d) + Y Yᵀ (Y n × 32) as bf16 triangles."""
    files = []
    for k in range(count):
        path = root / f"grams{k}.safetensors"
        files.append(path)
        if path.exists():
            continue
        root.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(1000 + k)
        by_input: dict[str, torch.Tensor] = {}
        for module, (_, width) in layout.items():
            if input_of(module) in by_input:
                continue
            d = 1 + torch.rand(width, generator=g)
            if diagonal:
                by_input[input_of(module)] = d
            else:
                y = torch.randn(width, 32, generator=g) / 32**0.5
                gram = y @ y.T
                gram.diagonal().add_(d)
                by_input[input_of(module)] = gram
        adapters.save_grams(
            path, {m: by_input[input_of(m)] for m in layout}, dtype=None if diagonal else torch.bfloat16
        )
    return files


def drop_from_page_cache(paths) -> None:
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def input_files(dirs, gram_files) -> list[Path]:
    return [d / n for d in dirs for n in (adapters.CONFIG_NAME, adapters.WEIGHTS_NAME)] + sorted(set(gram_files))


def disk_read_GBps(paths) -> float:
    """Reading these files cold (dropped from the page cache first) in 16 MB reads."""
    drop_from_page_cache(paths)
    total, start = 0, time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(16 << 20):
                total += len(chunk)
    return total / (time.perf_counter() - start) / 1e9


# ------------------------------------------------------------------------------------ child processes

CHILD = r"""
import json, sys, threading, time
spec = json.loads(sys.argv[1])
peak, done = [0], threading.Event()
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], status("RssAnon:"))
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
import torch
start = time.perf_counter()
if spec["path"] == "lorm":
    from lorm_ext.adapter_merge import merge_lora_adapters
    merge_lora_adapters(spec["dirs"], spec["grams"], spec["rank"], method="exact", output_dir=spec["out"],
                        workers=spec["workers"], keep_factors=False)
    loaded = start
else:
    from torch import nn
    from peft import PeftModel
    base = nn.Module()  # the LoRA targets only; their weights are allocated, never touched (PEFT needs shapes)
    for module, (out, width) in spec["layout"].items():
        parent = base
        *path, leaf = module.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        with torch.device("meta"):
            parent.add_module(leaf, nn.Linear(width, out, bias=False))
    base = base.to_empty(device="cpu")
    names = [f"a{k}" for k in range(len(spec["dirs"]))]
    model = PeftModel.from_pretrained(base, spec["dirs"][0], adapter_name=names[0])
    for name, folder in zip(names[1:], spec["dirs"][1:]):
        model.load_adapter(folder, adapter_name=name)
    loaded = time.perf_counter()
    kind = spec["path"].removeprefix("peft_")
    options = {"svd_rank": spec["rank"]} if kind == "svd" else {}
    model.add_weighted_adapter(names, [1 / len(names)] * len(names), "merged", combination_type=kind, **options)
    model.save_pretrained(spec["out"], selected_adapters=["merged"])
end = time.perf_counter()
done.set()
print(json.dumps({"seconds": end - loaded, "load_seconds": loaded - start,
                  "peak_rss_mb": status("VmHWM:") / 1e6, "peak_anon_mb": peak[0] / 1e6}))
"""


class ChildKilled(RuntimeError):
    """A path's process was killed by a signal: on this machine, by the kernel when memory ran out."""

    def __init__(self, path: str, signal_number: int):
        super().__init__(f"{path} was killed by signal {signal_number}")
        self.signal_number = signal_number


def run_child(spec: dict, inputs) -> dict:
    drop_from_page_cache(inputs)
    run = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    if run.returncode < 0:
        raise ChildKilled(spec["path"], -run.returncode)
    if run.returncode != 0:
        raise RuntimeError(f"{spec['path']} failed:\n{run.stderr[-4000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def objectives(dirs, gram_files, rank, scored: dict[str, Path]) -> dict[str, float]:
    """Total objective of LoRM's exact merge, of ΔW = 0 and of each scored adapter, from the same Grams."""
    from lorm_ext.adapter_merge import merge_lora_adapters

    result = merge_lora_adapters(dirs, gram_files, rank, method="exact", score=scored, keep_factors=False)
    names = {"exact": "lorm_exact", "zero": "zero", **{n: n for n in scored}}
    return {names[m]: sum(v.values()) for m, v in result.objectives.items()}


# -------------------------------------------------------------------------------------- exact solver


def plain_torch_exact(numerator, gram, rank):
    """What a competent user writes: G = L Lᵀ, X = N L⁻ᵀ, rank-r SVD of X, A = V_rᵀ L⁻¹."""
    L = torch.linalg.cholesky(gram)
    x = torch.linalg.solve_triangular(L.mT, numerator, upper=True, left=False)
    U, S, Vh = torch.linalg.svd(x, full_matrices=False)
    B = U[:, :rank] * S[:rank]
    A = torch.linalg.solve_triangular(L, Vh[:rank], upper=False, left=False)
    return B, A


def eigh_exact(numerator, gram, rank):
    """The documented fallback: G = U Λ Uᵀ, the reference's L = U Λ^½."""
    return low_rank_exact(
        numerator.unsqueeze(0), gram.unsqueeze(0).clone(), rank, rcond=1e-300
    )  # rcond ≠ default: eigh


def solver_rows(shapes, rank, rank_sums, eigh_max, rows: list, save) -> None:
    """Append one row per (shape, Σ r_k) to ``rows``, saving after each."""
    for out, width in shapes:
        for rank_sum in rank_sums:
            g = torch.Generator().manual_seed(out + width + rank_sum)
            y = torch.randn(width, 64, generator=g, dtype=torch.float64)
            gram = y @ y.T + torch.diag(1 + torch.rand(width, generator=g, dtype=torch.float64))
            numerator = (
                torch.randn(out, rank_sum, generator=g, dtype=torch.float64)
                @ torch.randn(rank_sum, width, generator=g, dtype=torch.float64)
            ) @ gram
            timed = {}
            for name, solve in [
                ("lorm_ext", lambda: low_rank_exact(numerator, gram, rank, rank_bound=rank_sum)),
                ("plain_torch", lambda: plain_torch_exact(numerator, gram, rank)),
                ("eigh", lambda: eigh_exact(numerator, gram, rank)),
            ]:
                if name == "eigh" and width > eigh_max:
                    continue
                start = time.perf_counter()
                B, A = solve()
                timed[name] = (time.perf_counter() - start, (B @ A).reshape(out, width))
            ref = timed["plain_torch"][1]
            rows.append(
                {
                    "out": out,
                    "in": width,
                    "rank_sum": rank_sum,
                    "rank": rank,
                    **{f"{n}_s": t for n, (t, _) in timed.items()},
                    "max_rel_diff": max(((v - ref).abs().max() / ref.abs().max()).item() for _, v in timed.values()),
                }
            )
            print(
                f"| {out} × {width} | {rank_sum} | {timed['lorm_ext'][0]:.2f} | {timed['plain_torch'][0]:.2f} | "
                f"{timed['eigh'][0] if 'eigh' in timed else float('nan'):.2f} | "
                f"{timed['plain_torch'][0] / timed['lorm_ext'][0]:.1f} | {rows[-1]['max_rel_diff']:.1e} |",
                flush=True,
            )
            save()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--blocks", type=int, default=4, help="blocks of the diagonal-Gram rows")
    p.add_argument("--full-blocks", type=int, default=1, help="blocks of the full-Gram rows")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    p.add_argument("--full-gram-files", type=int, default=10, help="distinct full Gram files, reused across clients")
    p.add_argument("--peft-clients", type=int, nargs="*", default=[10], help="N at which PEFT's merges run too")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--solver-rank-sums", type=int, nargs="*", default=[160, 1600])
    p.add_argument(
        "--solver-widths",
        choices=("hidden", "ffn"),
        nargs="*",
        default=["hidden", "ffn"],
        help="solver rows for a q_proj-like (hidden × hidden) and a gate_proj-like (ffn × hidden) module",
    )
    p.add_argument("--eigh-max", type=int, default=4096, help="largest width the eigendecomposition row runs at")
    p.add_argument("--dir", type=Path, default=Path("/tmp/lorm-bench-adapters"), help="generated inputs (kept)")
    p.add_argument("--out", type=Path, default=Path("bench/results/adapters.json"))
    args = p.parse_args(argv)
    if args.blocks < 0 or args.full_blocks < 0:
        p.error("--blocks and --full-blocks must be >= 0 (0 leaves that kind's rows out)")

    info, ceil = machine(), ceilings()
    rows, solver = [], []

    def save() -> None:  # after every row: a long run that is stopped keeps what it measured
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]) if argv is None else argv,
                    "machine": info,
                    "ceilings": ceil,
                    "rows": rows,
                    "exact_solver": solver,
                    "note": "full-Gram rows reuse distinct_gram_files Gram files across clients",
                },
                indent=2,
            )
        )

    print(f"# {info['cpu']} ({info['isa']}), {info['threads']} threads, torch {info['torch']}")
    n_max = max(args.clients)
    sets = {"diagonal": args.blocks, "full": args.full_blocks}
    print(
        "\n| Grams | blocks | N | LoRM s | adapters/s | input GB | input GB/s | disk read GB/s | copy GB/s | "
        "peak RSS MB | peak anon MB | PEFT svd s | PEFT svd peak RSS MB | PEFT cat s | PEFT cat peak RSS MB | "
        "objective LoRM exact | PEFT svd | PEFT cat | zero |"
    )
    print("|" + "---|" * 19)
    for kind, blocks in sets.items():
        if blocks == 0:  # --blocks 0 or --full-blocks 0: that kind's rows are not wanted
            continue
        layout = llama_layout(args.hidden, args.ffn, blocks)
        root = args.dir / f"{kind}-{blocks}blocks"
        all_dirs = write_adapters(root / "adapters", layout, args.rank, n_max)
        distinct = write_grams(
            root / "grams", layout, n_max if kind == "diagonal" else args.full_gram_files, kind == "diagonal"
        )
        for n in args.clients:
            dirs = all_dirs[:n]
            grams = [distinct[k % len(distinct)] for k in range(n)]
            inputs = input_files(dirs, grams)
            disk = disk_read_GBps(inputs)
            out = root / f"merged-{n}"
            shutil.rmtree(out, ignore_errors=True)
            lorm = run_child(
                {
                    "path": "lorm",
                    "dirs": list(map(str, dirs)),
                    "grams": list(map(str, grams)),
                    "rank": args.rank,
                    "out": str(out),
                    "workers": args.workers,
                },
                inputs,
            )
            read_bytes = sum((d / adapters.WEIGHTS_NAME).stat().st_size for d in dirs) + sum(
                g.stat().st_size for g in grams
            )
            row = {
                "grams": kind,
                "blocks": blocks,
                "clients": n,
                "lorm_s": lorm["seconds"],
                "adapters_per_s": n / lorm["seconds"],
                "input_GB": read_bytes / 1e9,
                "input_GBps": read_bytes / 1e9 / lorm["seconds"],
                "disk_read_GBps": disk,
                "copy_GBps": ceil["copy_GBps"],
                "peak_rss_mb": lorm["peak_rss_mb"],
                "peak_anon_mb": lorm["peak_anon_mb"],
                "distinct_gram_files": len(set(grams)),
            }
            scored = {}
            if n in args.peft_clients:
                for combination in ("svd", "cat"):
                    folder = root / f"peft-{combination}-{n}"
                    shutil.rmtree(folder, ignore_errors=True)
                    try:
                        peft = run_child(
                            {
                                "path": f"peft_{combination}",
                                "dirs": list(map(str, dirs)),
                                "rank": args.rank,
                                "out": str(folder),
                                "layout": layout,
                            },
                            inputs,
                        )
                    except ChildKilled as killed:  # a result about PEFT (its memory), not a failure of the bench
                        row[f"peft_{combination}_killed_by_signal"] = killed.signal_number
                        continue
                    row[f"peft_{combination}_s"] = peft["seconds"]
                    row[f"peft_{combination}_load_s"] = peft["load_seconds"]
                    row[f"peft_{combination}_peak_rss_mb"] = peft["peak_rss_mb"]
                    scored[f"peft_{combination}"] = folder / "merged"
            row["objective"] = objectives(dirs, grams, args.rank, scored)
            rows.append(row)
            o = row["objective"]
            cells = [
                kind,
                blocks,
                n,
                f"{row['lorm_s']:.1f}",
                f"{row['adapters_per_s']:.2f}",
                f"{row['input_GB']:.2f}",
                f"{row['input_GBps']:.2f}",
                f"{disk:.2f}",
                f"{ceil['copy_GBps']:.1f}",
                f"{row['peak_rss_mb']:.0f}",
                f"{row['peak_anon_mb']:.0f}",
            ]
            for combination in ("svd", "cat"):
                if f"peft_{combination}_s" in row:
                    cells += [f"{row[f'peft_{combination}_s']:.1f}", f"{row[f'peft_{combination}_peak_rss_mb']:.0f}"]
                elif f"peft_{combination}_killed_by_signal" in row:
                    cells += [f"killed (signal {row[f'peft_{combination}_killed_by_signal']})", "–"]
                else:
                    cells += ["–", "–"]
            cells += [f"{o['lorm_exact']:.4e}"] + [f"{o[k]:.4e}" if k in o else "–" for k in ("peft_svd", "peft_cat")]
            cells += [f"{o['zero']:.4e}"]
            print("| " + " | ".join(map(str, cells)) + " |", flush=True)
            save()

    print("\n| module | Σ r_k | lorm_ext s | plain torch s | eigh s | × vs plain | max rel diff |")
    print("|---|---|---|---|---|---|---|")
    shapes = {"hidden": (args.hidden, args.hidden), "ffn": (args.ffn, args.hidden)}
    solver_rows([shapes[w] for w in args.solver_widths], args.rank, args.solver_rank_sums, args.eigh_max, solver, save)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
