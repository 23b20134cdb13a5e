"""``lorm-merge``: merge PEFT LoRA adapters with LoRM, and collect the Grams it needs.

    lorm-merge grams --adapter DIR --model FILE.py:build_model --batches FILE.py:batches -o grams.safetensors
    lorm-merge peft DIR1 DIR2 ... --grams G1 G2 ... --rank 8 [--method exact] [--report] [-o MERGED_DIR]

The same runs as ``python -m lorm_ext.merge_cli ...``. See docs/peft.md.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ._install import MissingExtra, needs_extra
from .adapter_merge import MERGE_METHODS, MergeResult, merge_device, merge_lora_adapters
from .adapters import AdapterFile, check_output_file, collect_grams, save_grams
from .progress import configure_cli_logging


def load_callable(spec: str) -> Callable:
    """``package.module:function`` or ``path/to/file.py:function``."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise ValueError(f"expected MODULE:FUNCTION or FILE.py:FUNCTION, got {spec!r}")
    if target.endswith(".py"):
        if not Path(target).is_file():
            raise ValueError(f"{target}: no such file (from {spec!r})")
        module_spec = importlib.util.spec_from_file_location(Path(target).stem, target)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"{target} has no function {name!r}")
    return function


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def run_grams(args: argparse.Namespace) -> None:
    with needs_extra("peft", "lorm-merge grams"):  # only this subcommand needs PEFT installed
        from peft import PeftModel

    check_output_file(args.output)  # before the model runs over all the data
    device = merge_device(args.device)
    adapter = AdapterFile(args.adapter)  # validates the adapter before the model is built
    model = PeftModel.from_pretrained(load_callable(args.model)(), args.adapter).to(device).eval()
    base = model.get_base_model()
    found = dict(base.named_modules())
    heads = [
        m
        for m, (_, width) in adapter.saved_matrices().items()  # linear modules_to_save: merged with RegMean
        if getattr(found.get(m), "in_features", None) == width
    ]
    modules = [*adapter.layout, *heads]
    batches = (_to_device(b, device) for b in load_callable(args.batches)())
    grams = collect_grams(
        base,
        modules,
        batches,
        diagonal=args.diagonal,
        dtype=getattr(torch, args.dtype),
        share_inputs=not args.no_sharing,
        mask_key=None if args.no_mask else args.mask_key,
    )
    save_grams(
        args.output, grams, layout=args.layout, dtype=getattr(torch, args.store_dtype) if args.store_dtype else None
    )
    kind = "diagonal" if args.diagonal else f"full ({args.layout})"
    stored = len({id(g) for g in grams.values()})
    print(
        f"wrote {kind} {args.store_dtype or args.dtype} Grams of {len(grams)} modules ({stored} distinct inputs) "
        f"to {args.output}"
    )


def format_objectives(result: MergeResult, written: str | None) -> str:
    """Per module, Σ_k ‖X_k (ΔW − ΔW_k)ᵀ‖² of each method computed; 'zero' is ΔW = 0, '*' marks the written one."""
    methods = list(result.objectives)
    modules = sorted(result.objectives["zero"])
    width = max(12, *(len(m) for m in modules))
    header = [f"{m}*" if m == written else m for m in methods]
    lines = [
        "objective Σ_k ‖X_k (ΔW − ΔW_k)ᵀ‖²_F per module (lower is better; zero = no update"
        + ("; * = written)" if written else ")"),
        f"{'module':<{width}}" + "".join(f"{h:>14}" for h in header),
    ]
    for module in modules + ["total"]:
        cells = []
        for method in methods:
            values = result.objectives[method]
            cells.append(sum(values.values()) if module == "total" else values[module])
        lines.append(f"{module:<{width}}" + "".join(f"{v:>14.6e}" for v in cells))
    return "\n".join(lines)


def _named_folder(text: str) -> tuple[str, str]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, folder


def run_peft(args: argparse.Namespace) -> None:
    result = merge_lora_adapters(
        args.adapters,
        args.grams,
        args.rank,
        method=args.method,
        output_dir=args.output,
        report=args.report,
        max_iters=args.max_iters,
        tol=args.tol,
        workers=args.workers,
        device=args.device,
        keep_factors=False,
        score=dict(args.score),
    )
    print(format_objectives(result, args.method if args.output else None))
    for module, how in result.saved_methods.items():
        print(
            f"modules_to_save {module}: " + ("RegMean with its Grams" if how == "regmean" else "mean over the adapters")
        )
    if args.output:
        print(f"wrote the {args.method} merge (rank {args.rank}) to {args.output}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorm-merge", description="Merge PEFT LoRA adapters with LoRM, and collect the Grams it needs."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    peft = commands.add_parser("peft", help="merge PEFT LoRA adapters into one (LoRM closed form) and score methods")
    peft.add_argument(
        "adapters", nargs="+", help="PEFT adapter folders (adapter_config.json + adapter_model.safetensors)"
    )
    peft.add_argument("--grams", nargs="+", required=True, help="one Gram file per adapter, in the same order")
    peft.add_argument("--rank", type=int, required=True, help="rank of the merged adapter")
    peft.add_argument(
        "--method",
        choices=MERGE_METHODS,
        default="exact",
        help="what to write: exact rank-r optimum (default), alternating LoRM steps, "
        "average of the factors, or PEFT's svd merge",
    )
    peft.add_argument("-o", "--output", help="folder for the merged adapter; without it only the table is printed")
    peft.add_argument(
        "--report",
        action="store_true",
        help="also compute and score every other method (the per-module objective table)",
    )
    peft.add_argument("--max-iters", type=int, default=500, help="alternating: most B/A step pairs")
    peft.add_argument("--tol", type=float, default=1e-12, help="alternating: stop at this relative decrease")
    peft.add_argument("--workers", type=int, default=2, help="module groups merged at once (threads)")
    peft.add_argument(
        "--score",
        action="append",
        type=_named_folder,
        default=[],
        metavar="NAME=DIR",
        help="also score this adapter (e.g. another tool's merge) with the same objective; repeatable",
    )
    peft.add_argument("--device", default="cpu", help="where the sums and solves run: cpu or cuda")
    peft.set_defaults(run=run_peft)

    grams = commands.add_parser("grams", help="collect one adapter's Grams over its data (needs peft)")
    grams.add_argument("--adapter", required=True, help="PEFT adapter folder: which modules, and the model to run")
    grams.add_argument("--model", required=True, help="MODULE:FUNCTION or FILE.py:FUNCTION returning the base model")
    grams.add_argument(
        "--batches",
        required=True,
        help="MODULE:FUNCTION or FILE.py:FUNCTION returning an iterable of model inputs "
        "(a tensor, a dict of keyword inputs, or a tuple of positional inputs)",
    )
    grams.add_argument("-o", "--output", required=True, help="safetensors file to write, keyed by module name")
    grams.add_argument("--diagonal", action="store_true", help="keep only diag(XᵀX) (Gram shrinkage α = 0)")
    grams.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="accumulation dtype")
    grams.add_argument(
        "--layout",
        choices=("triangle", "full"),
        default="triangle",
        help="full Grams stored as their upper triangle (default, half the size) or in full",
    )
    grams.add_argument(
        "--store-dtype",
        choices=("float32", "bfloat16", "float16", "float64"),
        help="storage dtype of the Grams (default: the accumulation dtype); read back exactly",
    )
    grams.add_argument(
        "--no-sharing", action="store_true", help="one Gram per module even where modules read the same input (q/k/v)"
    )
    grams.add_argument(
        "--mask-key",
        default="attention_mask",
        help="in dict batches, the 0/1 token mask (1 = token, 0 = padding): padding adds nothing",
    )
    grams.add_argument("--no-mask", action="store_true", help="count every position, padding included")
    grams.add_argument("--device", default="cpu", help="where to run the model, e.g. cuda")
    grams.set_defaults(run=run_grams)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_cli_logging()
    try:
        args.run(args)
    except (ValueError, OSError, MissingExtra) as err:  # AdapterFileError, LayerError, bad arguments, I/O, no PEFT
        print(f"lorm-merge {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
