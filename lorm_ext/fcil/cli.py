"""``lorm-fcil``: run strategies × seeds on identical splits, print and save the comparison.

Every flag of a run is a field of ``RunConfig`` under the authors' name; ``--strategies`` and ``--seed`` take
comma lists. All configurations are checked before the first one trains. The output folder gets one run
folder per strategy and seed (``<strategy>/seed<k>``; an interrupted run resumes, a finished one is reused, one
made by other code or on another machine only with ``--resume True``) and the comparison: comparison.md (the
table), comparison.json, accuracy_after_task.png and accuracy_matrices.png (per strategy, mean over seeds).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import shutil
import sys
import types
import typing
from pathlib import Path

import torch

from .._install import MissingExtra, needs_extra
from ..files import atomic_write
from ..progress import configure_cli_logging
from .config import STRATEGIES, STRATEGY_FIELDS, ConfigError, RunConfig
from .environment import pin_cpu_kernels, reexec_with_cpu_environment

# The driver, metrics and plots (timm, torchvision, matplotlib: the [fcil] extra) are imported by main() after the
# arguments are parsed: `--help` and argument errors need neither the extra nor their import time.

HELP = {
    "dataset": "mnist: the embedded default (MNIST digits shipped with the package: 4000 training, the 10 000 test images); cifar100: the python archive at "
    "--data_path; imagefolder: <data_path>/<class>/* (or train/ and test/ holding that)",
    "data_path": "the CIFAR-100 archive or folder, or the image folder",
    "n_tasks": "number of class-incremental tasks (default: mnist 5, cifar100 10, imagefolder 10)",
    "class_order": "label: classes in label order, as the authors; permuted: a permutation seeded by --seed",
    "split_file": "a JSON file of per-task, per-client train/test index lists (the format every run writes to "
    "<output_dir>/splits/seed<k>.json); default: the seeded Dirichlet split",
    "network": "digits-vit (the embedded small ViT pretrained on sklearn digits; its weights ship with lorm_ext) "
    "or a timm name, e.g. vit_base_patch16_224.augreg_in21k",
    "pretrained": "load pretrained weights (offline only: --pretrained_path or the Hugging Face cache)",
    "pretrained_path": "a local weights file (.safetensors/.pth timm checkpoint or the original .npz)",
    "r": "LoRA rank",
    "lora_alpha": "scale the update by lora_alpha / r (default: no scaling, as the authors)",
    "num_clients": "number of clients",
    "num_comm_rounds": "communication rounds per task",
    "participation_rate": "fraction of the clients taking part in each task",
    "distribution_alpha": "Dirichlet β of the label skew (smaller: more skewed)",
    "num_epochs": "local epochs per round",
    "batch_size": "local batch size",
    "lr": "AdamW learning rate (head, and factors without their own)",
    "lr_A": "learning rate of A (< 0: --lr; 0 freezes A, as the authors)",
    "lr_B": "learning rate of B (< 0: --lr; 0 freezes B, as the authors)",
    "wd_reg": "AdamW weight decay",
    "train_matrix": "lorm: alt (B in round 0, then A, B, ...), A or B",
    "alpha_regmean_head": "Gram shrinkage of the head: α G + (1 − α) diag G",
    "alpha_regmean_backbone": "Gram shrinkage of the adapted layers (0: diagonal Grams, the fast "
    "path; < 0: --alpha_regmean_head, the authors' default -1)",
    "regmean_rounds": "passes over the client's data to accumulate Grams",
    "gram_dtype": "Grams accumulate and travel in float32 (32) or float64 (64); merges are float64",
    "prereduce": "lorm: B-round messages pre-reduced to (B_k P_k, P_k) instead of (B_k, G_k)",
    "lora_fair_lambda": "lora-fair: λ of the ΔB regulariser",
    "lora_fair_steps": "lora-fair: Adam steps of the server correction",
    "lora_fair_lr": "lora-fair: step size relative to the RMS of B̄",
    "round_eval_samples": "test samples per seen task evaluated after each round, a fixed seeded sample (-1: all "
    "of them, as the authors' code); task ends always evaluate all of them (the accuracy matrix)",
    "device": "cpu or cuda[:N]",
    "num_threads": "CPU threads for torch (one is fastest for the embedded model on a busy 2-core machine)",
}


def str_to_bool(text: str) -> bool:
    """--flag True/False as the authors' command lines; anything else is an error."""
    lowered = text.lower()
    if lowered in ("true", "1", "t", "y", "yes"):
        return True
    if lowered in ("false", "0", "f", "n", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def _flag_type(annotation):
    """int | None -> int; bool -> str_to_bool."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    return str_to_bool if annotation is bool else annotation


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: …)" unless the help text already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if "default" in action.help else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorm-fcil",
        description="Federated class-incremental learning with LoRM and LoRA baselines on identical splits.",
        formatter_class=_DefaultsHelpFormatter,
    )
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help=f"comma list of {', '.join(STRATEGIES)}")
    parser.add_argument("--seed", "--random_seed", default="0", help="a seed or a comma list (mean ± std over them)")
    parser.add_argument("--output_dir", default=None, help="default: runs/<dataset>-<network>-beta<β>")
    parser.add_argument("--overwrite", type=str_to_bool, default=False, help="discard earlier runs in --output_dir")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at a time, each in its own process (every run is single-threaded and deterministic, so the "
        "results do not depend on it)",
    )
    parser.add_argument(
        "--resume",
        type=str_to_bool,
        default=False,
        help="reuse finished runs in --output_dir even when made by other code or on another machine (interrupted "
        "runs always resume)",
    )
    hints = typing.get_type_hints(RunConfig)
    for field in dataclasses.fields(RunConfig):
        if field.name in ("strategy", "seed"):
            continue
        parser.add_argument(
            f"--{field.name}", type=_flag_type(hints[field.name]), default=field.default, help=HELP[field.name]
        )
    return parser


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"{flag} must be an integer or a comma list of integers, got {text!r}") from None


def configurations(args: argparse.Namespace) -> list[RunConfig]:
    """One configuration per seed and strategy; a flag that only unselected strategies read is an error."""
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if not strategies:
        raise ConfigError("--strategies is empty")
    fields = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig) if f.name not in ("strategy", "seed")
    }
    defaults = RunConfig()
    for owner, names in STRATEGY_FIELDS.items():
        for name in names:
            if owner not in strategies and fields[name] != getattr(defaults, name):
                raise ConfigError(
                    f"--{name} applies to {owner} only, which --strategies {args.strategies} does not include"
                )
    return [
        RunConfig.for_strategy(s, seed=seed, **fields) for seed in _int_list(args.seed, "--seed") for s in strategies
    ]


def machine_line(results: dict[str, list[dict]]) -> str:
    """The machines and backbones the runs report (one line each when they differ)."""
    lines = []
    for runs in results.values():
        for r in runs:
            env = r["environment"]
            line = (
                f"machine: {env.get('cpu_model')} ({env.get('cpu_isa')}), {env.get('threads')} thread(s), torch "
                f"{env.get('torch')} kernels {env.get('torch_cpu_capability')}, MKL_CBWR "
                f"{(env.get('variables') or {}).get('MKL_CBWR')}; backbone sha256 {env.get('backbone_sha256')}"
            )
            if line not in lines:
                lines.append(line)
    return "\n".join(lines)


def write_comparison(output_dir: str, results: dict[str, list[dict]]) -> str:
    """Table, JSON and plots of finished runs grouped by strategy; returns the table."""
    import numpy as np

    from .metrics import comparison_table, wins_table
    from .plots import as_array, plot_accuracy_after_tasks, plot_accuracy_matrices

    table = comparison_table(results)
    wins = wins_table(results)
    if wins:
        table += f"\n\nPer seed (identical splits), LoRM against each other strategy:\n\n{wins}"
    first = next(iter(results.values()))[0]["config"]
    title = f"{first['dataset']}, {first['network']}, β = {first['distribution_alpha']}, seeds " + ",".join(
        str(r["seed"]) for r in next(iter(results.values()))
    )
    with open(os.path.join(output_dir, "comparison.md"), "w") as file:
        file.write(f"{title}\n\n{machine_line(results)}\n\n{table}\n")
    with open(os.path.join(output_dir, "comparison.json"), "w") as file:
        json.dump(
            {
                s: [{k: r[k] for k in ("seed", "summary", "accuracy_after_task", "accuracy_matrix")} for r in runs]
                for s, runs in results.items()
            },
            file,
            indent=1,
        )
    plot_accuracy_after_tasks(
        {s: [r["accuracy_after_task"] for r in runs] for s, runs in results.items()},
        os.path.join(output_dir, "accuracy_after_task.png"),
        title,
    )
    several = any(len(runs) > 1 for runs in results.values())
    plot_accuracy_matrices(
        {s: np.mean([as_array(r["accuracy_matrix"]) for r in runs], axis=0) for s, runs in results.items()},
        os.path.join(output_dir, "accuracy_matrices.png"),
        f"accuracy matrices{', mean over seeds' if several else ''} ({title})",
    )
    return table


def _start_worker(num_threads: int) -> None:
    """A run process: the threads and CPU kernels of the parent (the environment variables are inherited)."""
    configure_cli_logging()
    torch.set_num_threads(num_threads)
    pin_cpu_kernels()


def _run_all(run, jobs: list[tuple], processes: int, num_threads: int) -> list[dict]:
    """run(*job) for every job, in order; with processes > 1 that many at a time in fresh (spawned) processes."""
    if processes == 1 or len(jobs) == 1:
        return [run(*job) for job in jobs]
    context = multiprocessing.get_context("spawn")  # forking a process with OpenMP threads is unsafe
    with concurrent.futures.ProcessPoolExecutor(
        min(processes, len(jobs)), mp_context=context, initializer=_start_worker, initargs=(num_threads,)
    ) as pool:
        futures = [pool.submit(run, *job) for job in jobs]
        return [future.result() for future in futures]


def main(argv: list[str] | None = None) -> int:
    """argv None: the command line (``lorm-fcil``), which restarts itself with the CPU settings of
    ``environment.CPU_ENVIRONMENT`` unless the process already has them (after parsing: ``--help`` and argument
    errors need no second process)."""
    args = build_parser().parse_args(argv)
    if argv is None:
        reexec_with_cpu_environment("lorm_ext.fcil.cli")
    configure_cli_logging()
    try:
        with needs_extra("fcil", "lorm-fcil"):
            from .driver import check, check_run_dir, finished_results, prepare, run, split_bytes
    except MissingExtra as error:
        print(f"lorm-fcil: error: {error}", file=sys.stderr)
        return 2
    try:
        if args.jobs < 1:
            raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")
        configs = configurations(args)
        base = configs[0]
        output_dir = args.output_dir or os.path.join(
            "runs", f"{base.dataset}-{base.network}-beta{base.distribution_alpha}"
        )
        run_dirs = [os.path.join(output_dir, c.strategy, f"seed{c.seed}") for c in configs]
        if args.overwrite and args.resume:
            raise ConfigError("--overwrite True discards the runs that --resume True would reuse: pass one of them")
        for config, run_dir in zip(configs, run_dirs):
            check(config)
            if args.overwrite:
                shutil.rmtree(run_dir, ignore_errors=True)
            check_run_dir(config, run_dir)
            finished_results(run_dir, args.resume)  # a finished run made elsewhere: stop before any work
        torch.set_num_threads(base.num_threads)
        pin_cpu_kernels()
        data = {}
        for config in configs:  # every seed's data and split before the first run trains
            if config.seed not in data:
                data[config.seed] = prepare(config)
                split_path = os.path.join(output_dir, "splits", f"seed{config.seed}.json")
                os.makedirs(os.path.dirname(split_path), exist_ok=True)
                payload = split_bytes(data[config.seed])
                atomic_write(split_path, lambda tmp: Path(tmp).write_bytes(payload))  # runs may share the folder
    except ConfigError as error:
        print(f"lorm-fcil: error: {error}", file=sys.stderr)
        return 2
    results: dict[str, list[dict]] = {}
    try:
        jobs = [(config, data[config.seed], run_dir, args.resume) for config, run_dir in zip(configs, run_dirs)]
        for config, outcome in zip(configs, _run_all(run, jobs, args.jobs, base.num_threads)):
            results.setdefault(config.strategy, []).append(outcome)
    except ConfigError as error:  # a run folder that cannot be resumed (its checkpoint, say)
        print(f"lorm-fcil: error: {error}", file=sys.stderr)
        return 2
    print(write_comparison(output_dir, results))
    print(f"\nruns and comparison in {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
