"""Merge N PEFT LoRA adapters into one, streaming module group by module group (docs/peft.md).

For each group of modules — one module, or the modules that read one input and so share a Gram (q/k/v of a
block, gate/up) — every adapter's factors of those modules and every Gram file's Grams of their inputs are
read (memory-mapped, each Gram once, in row panels), folded into that group's sums

    G = Σ_k G_k,   N = Σ_k B_k A_k G_k,   c = Σ_k ‖X_k (B_k A_k)ᵀ‖²   (+ Σ B_k, Σ A_k or Σ B_k A_k when asked),

solved, written at its place in the output file, and released. Memory is one group's sums per worker
thread, whatever the number of adapters or the size of the model. ``lorm_ext.reference`` states the math.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .adapters import (
    _MUST_AGREE_FIELDS,
    _PANEL_ENTRIES,
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterFile,
    AdapterFileError,
    GramFile,
    OutputFolder,
    StreamedSafetensors,
    _to_device,
    adapter_config,
    factor_keys,
    saved_key,
)
from .merge import (
    FactoredNumerator,
    RegMeanMerger,
    _top_singular,
    excess_objective,
    low_rank_alternating,
    low_rank_exact,
)
from .progress import Progress
from .reference import DEFAULT_RCOND
from .validation import LayerError, check_rank_fits

MERGE_METHODS = ("exact", "alternating", "average", "svd")
logger = logging.getLogger(__name__)


@dataclass
class MergeResult:
    """The merged adapter of the chosen method ({module: (B, A)} in float64; empty with keep_factors=False)
    and the objective Σ_k ‖X_k (ΔW − ΔW_k)ᵀ‖² per module of the chosen method and ``zero`` (ΔW = 0), or of every
    method with ``report``. A method that does not apply is absent (average with different ranks)."""

    factors: dict[str, tuple[Tensor, Tensor]]
    objectives: dict[str, dict[str, float]]  # method -> module -> objective
    # modules_to_save copies: module -> parameter -> merged tensor (float64; empty with keep_factors=False), and
    # how each module was merged: "regmean" (a linear head whose Grams were given) or "mean"
    saved: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    saved_methods: dict[str, str] = field(default_factory=dict)


@dataclass
class _Input:
    """Modules that have the same stored Gram in every file: one running ΣG serves them all."""

    modules: list[str]
    width: int
    diagonal: bool


@dataclass
class _Group:
    """Modules linked by a shared Gram in some file: folded together, so that each Gram is read once."""

    modules: list[str]
    inputs: list[_Input] = field(default_factory=list)


def plan_groups(layout: dict[str, tuple[int, int, int]], gram_files: Sequence[GramFile]) -> list[_Group]:
    """The module groups and their inputs, from the Gram files' indexes; a module's Grams must be all full or
    all diagonal."""
    parent = {m: m for m in layout}

    def root(m: str) -> str:
        while parent[m] != m:
            parent[m] = parent[parent[m]]
            m = parent[m]
        return m

    for grams in gram_files:
        first_reader: dict[str, str] = {}
        for module in sorted(layout):
            other = first_reader.setdefault(grams.index[module], module)
            parent[root(module)] = root(other)
    first = gram_files[0]
    for grams in gram_files[1:]:
        for module in sorted(layout):
            if grams.is_diagonal(module) != first.is_diagonal(module):
                kinds = {True: "diagonal", False: "full"}
                raise AdapterFileError(
                    grams.path,
                    f"Gram is {kinds[grams.is_diagonal(module)]} but the first Gram "
                    f"file's is {kinds[first.is_diagonal(module)]}",
                    module,
                )
    groups: dict[str, _Group] = {}
    inputs: dict[tuple, _Input] = {}
    for module in sorted(layout):
        group = groups.setdefault(root(module), _Group([]))
        group.modules.append(module)
        keys = (root(module),) + tuple(grams.index[module] for grams in gram_files)
        if keys not in inputs:
            inputs[keys] = _Input([], layout[module][2], first.is_diagonal(module))
            group.inputs.append(inputs[keys])
        inputs[keys].modules.append(module)
    return list(groups.values())


class _GroupSums:
    """One group's running sums on ``device``, in float64. Numerators of modules with one input and one output
    width are stacked, so that one factorisation of their ΣG serves all of them. A stack whose total rank
    R = Σ_k r_k (``ranks``, the largest of its modules) makes [B_1 … B_K] and [A_1 G_1; …] smaller than the
    dense out × in N keeps them instead (a ``FactoredNumerator``): folding an adapter in is then a copy."""

    def __init__(self, group: _Group, layout, ranks: Mapping[str, int], device, *, average: bool, svd: bool):
        self.group, self.layout, self.device = group, layout, device
        self.gram: dict[str, Tensor] = {}  # module -> ΣG (one tensor per input)
        self.batches: list[tuple[list[str], Tensor | FactoredNumerator, Tensor]] = []  # (modules, stacked N, ΣG)
        self.numerator: dict[str, Tensor | FactoredNumerator] = {}
        zeros = dict(dtype=torch.float64, device=device)
        for inp in group.inputs:
            gram = torch.zeros((inp.width,) if inp.diagonal else (inp.width, inp.width), **zeros)
            by_out: dict[int, list[str]] = {}
            for module in inp.modules:
                self.gram[module] = gram
                by_out.setdefault(layout[module][0], []).append(module)
            for out, modules in by_out.items():
                total_rank = max(ranks[m] for m in modules)
                if total_rank * (out + inp.width) < out * inp.width:
                    stacked = FactoredNumerator(
                        torch.zeros(len(modules), out, total_rank, **zeros),
                        torch.zeros(len(modules), total_rank, inp.width, **zeros),
                    )
                else:
                    stacked = torch.zeros(len(modules), out, inp.width, **zeros)
                self.batches.append((modules, stacked, gram))
                self.numerator.update((m, stacked[i]) for i, m in enumerate(modules))
        self.constant = {m: torch.zeros((), **zeros) for m in group.modules}
        self.rank_sum = dict.fromkeys(group.modules, 0)
        self.sum_b = {m: torch.zeros(layout[m][:2], **zeros) for m in group.modules} if average else None
        self.sum_a = {m: torch.zeros(layout[m][1:], **zeros) for m in group.modules} if average else None
        self.sum_delta = {m: torch.zeros(layout[m][0], layout[m][2], **zeros) for m in group.modules} if svd else None
        self.count = 0

    def fold(self, adapter: AdapterFile, grams: GramFile, progress: _Progress) -> None:
        """Add one adapter and its Grams: every Gram is read once, in panels of rows."""
        factors = {m: adapter.factors(m, self.device) for m in self.group.modules}
        progress.read(sum(adapter.nbytes(m) for m in self.group.modules))
        readers: dict[str, list[str]] = {}
        for module in self.group.modules:
            readers.setdefault(grams.index[module], []).append(module)
        for key, modules in readers.items():
            a = torch.cat([factors[m][1] for m in modules])  # the factors A of every reader, stacked
            sums = list({id(self.gram[m]): self.gram[m] for m in modules}.values())
            if grams.is_diagonal(modules[0]):
                g = _to_device(grams.diagonal(key, modules), self.device).double()
                for total in sums:
                    total += g
                ag = a * g
            else:
                ag = torch.zeros_like(a)
                for panel in grams.panels(key, modules):
                    p = _to_device(panel.values, self.device)
                    start, stop = panel.start, panel.stop
                    upper = p if panel.mirrored else p[:, start:]
                    for total in sums:  # ΣG keeps its upper triangle only, mirrored once before the solve
                        total[start:stop, start:] += upper
                    if panel.mirrored:  # columns stop.. of the panel stand for G[stop:, start:stop] too
                        ag[:, start:].addmm_(a[:, start:stop], p)
                        ag[:, start:stop].addmm_(a[:, stop:], p[:, stop - start :].mT)
                    else:
                        ag.addmm_(a[:, start:stop], p)
            progress.read(grams.nbytes(key))
            row = 0
            for module in modules:
                b, a_k = factors[module]
                ag_k = ag[row : row + a_k.shape[0]]
                row += a_k.shape[0]
                numerator, done, r_k = self.numerator[module], self.rank_sum[module], a_k.shape[0]
                if isinstance(numerator, FactoredNumerator):
                    numerator.left[:, done : done + r_k] = b
                    numerator.right[done : done + r_k] = ag_k
                else:
                    numerator.addmm_(b, ag_k)
                self.constant[module] += ((b.mT @ b) * (ag_k @ a_k.mT)).sum()
                self.rank_sum[module] += r_k
                if self.sum_b is not None:
                    self.sum_b[module] += b
                    self.sum_a[module] += a_k
                if self.sum_delta is not None:
                    self.sum_delta[module].addmm_(b, a_k)
        self.count += 1

    def solve(self, methods: Sequence[str], rank: int, max_iters: int, tol: float, scored: Mapping[str, AdapterFile]):
        """{method: {module: (B, A)}} for each method asked for, and {name: {module: objective}} for them, 'zero'
        and each ``scored`` adapter."""
        for gram in {id(g): g for g in self.gram.values()}.values():
            if gram.dim() == 2:
                _mirror_upper_(gram)
        merged: dict[str, dict[str, tuple[Tensor, Tensor]]] = {m: {} for m in methods}
        objectives: dict[str, dict[str, float]] = {m: {} for m in (*methods, "zero", *scored)}
        for modules, numerators, gram in self.batches:
            constants = torch.stack([self.constant[m] for m in modules])
            one_gram = gram.unsqueeze(0)  # broadcast over the stacked modules
            bound = max(self.rank_sum[m] for m in modules)
            for method in methods:
                if method == "exact":
                    B, A = _exact(numerators, one_gram, rank, bound)
                elif method == "alternating":  # its steps read the dense N
                    grams = one_gram.expand(len(modules), *gram.shape).contiguous()
                    dense = numerators.dense() if isinstance(numerators, FactoredNumerator) else numerators
                    B, A, _ = low_rank_alternating(
                        dense, grams, rank, constant=constants, max_iters=max_iters, tol=tol, rcond=DEFAULT_RCOND
                    )
                    del dense
                elif method == "average":
                    B = torch.stack([self.sum_b[m] for m in modules]) / self.count
                    A = torch.stack([self.sum_a[m] for m in modules]) / self.count
                else:  # svd of the mean update, PEFT's add_weighted_adapter(combination_type="svd")
                    U, S, Vh = _top_singular(
                        torch.stack([self.sum_delta[m] for m in modules]) / self.count, rank, bound
                    )
                    B, A = U * S.unsqueeze(-2), Vh
                values = (excess_objective(numerators, one_gram, B, A) + constants).tolist()
                for i, module in enumerate(modules):
                    merged[method][module] = (B[i], A[i])
                    objectives[method][module] = values[i]
            objectives["zero"].update(zip(modules, constants.tolist()))
            for name, adapter in scored.items():  # ranks may differ between modules: one at a time
                for i, module in enumerate(modules):
                    B, A = adapter.factors(module, self.device)
                    objectives[name][module] = float(excess_objective(numerators[i], gram, B, A) + constants[i])
        return merged, objectives


def _exact(numerators: Tensor | FactoredNumerator, gram: Tensor, rank: int, bound: int) -> tuple[Tensor, Tensor]:
    """``low_rank_exact`` of a stack of modules; dense numerators one module at a time: their solve may be a
    full SVD, whose workspace, several modules' at once, would be the merge's peak memory."""
    if isinstance(numerators, FactoredNumerator) or len(numerators) == 1:
        return low_rank_exact(numerators, gram, rank, DEFAULT_RCOND, rank_bound=bound)
    parts = [low_rank_exact(numerator[None], gram, rank, DEFAULT_RCOND, rank_bound=bound) for numerator in numerators]
    return torch.cat([B for B, _ in parts]), torch.cat([A for _, A in parts])


def _mirror_upper_(gram: Tensor) -> None:
    """Copy the upper triangle of a square matrix onto its lower one, in place, a panel of rows at a time."""
    width = gram.shape[0]
    step = max(1, min(width, _PANEL_ENTRIES // width))
    for start in range(0, width, step):
        stop = min(start + step, width)
        gram[stop:, start:stop] = gram[start:stop, stop:].mT
        block = gram[start:stop, start:stop]
        block.copy_(block.triu() + block.triu(1).mT)


class _Progress:
    """Module groups done and bytes read (``progress.Progress``: a bar on a terminal, else log lines)."""

    def __init__(self, groups: int, total_bytes: int):
        self.total_bytes, self.bytes = total_bytes, 0
        self.start = time.monotonic()
        self.lock = threading.Lock()
        self.progress = Progress(groups, "merging modules", "group", logger)

    def read(self, nbytes: int) -> None:
        with self.lock:
            self.bytes += nbytes

    def group_done(self) -> None:
        with self.lock:
            rate = self.bytes / max(time.monotonic() - self.start, 1e-9)
            read = f"{self.bytes / 1e9:.2f} of {self.total_bytes / 1e9:.2f} GB read at {rate / 1e6:.0f} MB/s"
            self.progress.update(read)

    def close(self) -> None:
        self.progress.close()


def plan_saved(first: AdapterFile, gram_files: Sequence[GramFile]) -> dict[str, str]:
    """How each ``modules_to_save`` copy is merged: "regmean" for a linear head that every Gram file has a Gram
    of (checked: its width), "mean" for the others; a head's Gram in some files only is an error."""
    heads = first.saved_matrices()
    methods = {}
    for module in sorted(first.saved):
        having = [g for g in gram_files if module in g.index] if module in heads else []
        if having and len(having) != len(gram_files):
            lacking = next(g for g in gram_files if module not in g.index)
            raise AdapterFileError(
                lacking.path,
                f"has no Gram for this modules_to_save head but {having[0].path} has "
                "one: give its Gram in every Gram file or in none",
                module,
            )
        for grams in having:
            grams.check_modules({module: heads[module][1]})
        methods[module] = "regmean" if having else "mean"
    return methods


def merge_saved(
    adapters: Sequence[AdapterFile], gram_files: Sequence[GramFile], methods: Mapping[str, str], device: torch.device
) -> dict[str, dict[str, Tensor]]:
    """The merged ``modules_to_save`` copies (``plan_saved``'s methods): a head's weight by RegMean,
    W = (Σ_k W_k G_k)(Σ_k G_k)⁺ with the Grams of its input; every other tensor (biases, norms, heads without
    Grams) the mean over the adapters. In float64, one module at a time."""
    merged: dict[str, dict[str, Tensor]] = {}
    for module, method in methods.items():
        merged[module] = {}
        for parameter in sorted(adapters[0].saved[module]):
            if method == "regmean" and parameter == "weight":
                merger = RegMeanMerger(dtype=torch.float64, device=device)
                for adapter, grams in zip(adapters, gram_files):
                    gram = _to_device(grams.dense(module), device).double()
                    try:
                        merger.add_client({module: adapter.saved_tensor(module, parameter, device)}, {module: gram})
                    except LayerError as err:
                        raise AdapterFileError(adapter.weights_path, err.problem, module) from None
                merged[module][parameter] = merger.merge()[module]
            else:
                total = sum(adapter.saved_tensor(module, parameter, device) for adapter in adapters)
                merged[module][parameter] = total / len(adapters)
    return merged


def merge_device(device: str | torch.device) -> torch.device:
    """A device for the sums and solves, or a one-line error (an unknown name, no GPU present)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not one torch knows (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: no CUDA GPU is available here (torch.cuda.is_available() is False)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r}: merging runs on cpu or cuda")
    return device


def _check_same_adapter_kind(first: AdapterFile, other: AdapterFile) -> None:
    """Same modules, same layer shapes and the same base model as the first adapter; ranks may differ."""
    missing, extra = sorted(set(first.layout) - set(other.layout)), sorted(set(other.layout) - set(first.layout))
    if missing or extra:
        parts = ([f"lacks module(s) {missing}"] if missing else []) + (
            [f"has extra module(s) {extra}"] if extra else []
        )
        raise AdapterFileError(other.weights_path, " and ".join(parts) + f" compared with {first.weights_path}")
    for module, (out, _, width) in other.layout.items():
        first_out, _, first_width = first.layout[module]
        if (out, width) != (first_out, first_width):
            raise AdapterFileError(
                other.weights_path,
                f"shape mismatch: ΔW is {out} × {width} here but {first_out} × {first_width} in {first.weights_path}",
                module,
            )
    for name in sorted(_MUST_AGREE_FIELDS):
        if (first.config.get(name) or None) != (other.config.get(name) or None):  # absent = None = False
            raise AdapterFileError(
                other.path / CONFIG_NAME,
                f"{name}={other.config.get(name)!r} differs from "
                f"{first.config.get(name)!r} in {first.path / CONFIG_NAME}",
            )


def _check_same_saved_modules(first: AdapterFile, other: AdapterFile) -> None:
    """The same modules_to_save copies, parameters and shapes as the first adapter (dtypes may differ)."""
    shapes = [
        {m: {p: shape for p, (shape, _) in params.items()} for m, params in a.saved.items()} for a in (first, other)
    ]
    if shapes[0] != shapes[1]:
        raise AdapterFileError(
            other.weights_path, f"modules_to_save tensors {shapes[1]} differ from {shapes[0]} in {first.weights_path}"
        )


def _check_options(rank, method, max_iters, tol, workers) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {MERGE_METHODS}")
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"max_iters (--max-iters) must be a positive integer, got {max_iters!r}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol (--tol) must be a finite number ≥ 0, got {tol!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers (--workers) must be a positive integer, got {workers!r}")


def merge_lora_adapters(
    adapter_dirs: Sequence[str | os.PathLike],
    gram_files: Sequence[str | os.PathLike],
    rank: int,
    *,
    method: str = "exact",
    output_dir: str | os.PathLike | None = None,
    report: bool = False,
    max_iters: int = 500,
    tol: float = 1e-12,
    workers: int = 2,
    device: str | torch.device = "cpu",
    keep_factors: bool = True,
    score: Mapping[str, str | os.PathLike] | None = None,
) -> MergeResult:
    """Merge PEFT LoRA adapters, adapter k with the Grams of its data (``gram_files[k]``), into one
    rank-``rank`` adapter minimising Σ_k ‖X_k (ΔW − ΔW_k)ᵀ‖², streaming module group by module group.

    Methods: "exact" (the closed-form rank-r optimum), "alternating" (LoRM's exact B- and A-steps),
    "average" (mean of the B_k and of the A_k; needs equal ranks, and ``rank`` equal to them) and "svd"
    (PEFT's add_weighted_adapter svd merge with weights 1/N). Only ``method`` is computed, and scored with
    ΔW = 0 ("zero") for scale; ``report`` computes and scores every method. Every header is checked before
    any tensor is read; with ``output_dir`` the adapter is written into a temporary folder beside it, renamed
    into place at the end (never over an input; on any error nothing is left). ``workers`` threads merge
    independent groups at once; ``device="cuda"`` keeps the sums and solves on the GPU. ``score``
    ({name: adapter folder}) scores other merges of the same modules, e.g. PEFT's, with the same objective.
    """
    _check_options(rank, method, max_iters, tol, workers)
    if len(adapter_dirs) == 0 or len(adapter_dirs) != len(gram_files):
        raise ValueError(f"give one Gram file per adapter: {len(adapter_dirs)} adapters, {len(gram_files)} Gram files")
    device = merge_device(device)
    inputs = [p for d in adapter_dirs for p in (Path(d) / CONFIG_NAME, Path(d) / WEIGHTS_NAME)] + list(gram_files)
    output = OutputFolder(output_dir, inputs) if output_dir is not None else None

    adapters = [AdapterFile(d) for d in adapter_dirs]
    first = adapters[0]
    for module, (out, _, width) in first.layout.items():
        try:
            check_rank_fits(module, rank, out, width)
        except LayerError as err:
            raise AdapterFileError(first.weights_path, err.problem, module) from None
    scored = {name: AdapterFile(d) for name, d in (score or {}).items()}
    clash = sorted(set(scored) & {*MERGE_METHODS, "zero"})
    if clash:
        raise ValueError(f"score names {clash} are method names; choose others")
    for adapter in (*adapters[1:], *scored.values()):
        _check_same_adapter_kind(first, adapter)
    for adapter in adapters[1:]:  # scores use the LoRA modules only
        _check_same_saved_modules(first, adapter)
    grams = [GramFile(p) for p in gram_files]
    widths = {m: width for m, (_, _, width) in first.layout.items()}
    for gram_file in grams:
        gram_file.check_modules(widths)
    groups = plan_groups(first.layout, grams)
    saved_methods = plan_saved(first, grams)

    equal_ranks = all(a.layout == first.layout for a in adapters[1:])
    methods = [m for m in MERGE_METHODS if m != "average" or equal_ranks] if report else [method]
    if method == "average":
        if not equal_ranks:
            raise ValueError("method 'average' needs adapters of equal ranks; these differ")
        average_ranks = sorted({r for _, r, _ in first.layout.values()})
        if average_ranks != [rank]:
            raise ValueError(f"method 'average' keeps the adapters' rank {average_ranks}; pass that rank")

    total_ranks = {m: sum(a.layout[m][1] for a in adapters) for m in first.layout}  # R = Σ_k r_k per module
    total_bytes = sum(a.nbytes(m) for a in adapters for m in first.layout)
    total_bytes += sum(g.nbytes(k) for g in grams for k in {g.index[m] for m in first.layout})
    progress = _Progress(len(groups), total_bytes)
    result = MergeResult({}, {m: {} for m in (*methods, "zero", *scored)}, saved_methods=saved_methods)
    lock = threading.Lock()

    def merge_group(group: _Group, writer: StreamedSafetensors | None) -> None:
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            sums = _GroupSums(
                group, first.layout, total_ranks, device, average="average" in methods, svd="svd" in methods
            )
            for adapter, gram_file in zip(adapters, grams):
                sums.fold(adapter, gram_file, progress)
            merged, objectives = sums.solve(methods, rank, max_iters, tol, scored)
            del sums
            chosen = {m: (b.to("cpu"), a.to("cpu")) for m, (b, a) in merged[method].items()}
        if writer is not None:
            for module, (b, a) in chosen.items():
                key_b, key_a = factor_keys(module)
                writer.write(key_b, b)
                writer.write(key_a, a)
        with lock:
            for name, values in objectives.items():
                result.objectives[name].update(values)
            if keep_factors:
                result.factors.update(chosen)
        progress.group_done()

    def run(writer: StreamedSafetensors | None) -> None:
        saved = merge_saved(adapters, grams, saved_methods, device)  # small: before the long stream
        for module, parameters in saved.items():
            for parameter, tensor in parameters.items():
                if writer is not None:
                    writer.write(saved_key(module, parameter), tensor)
                if keep_factors:
                    result.saved.setdefault(module, {})[parameter] = tensor.to("cpu")
        # The workers share the intra-op threads: each of them would otherwise start a team of all of them
        # inside every op (OpenMP and MKL count threads per calling thread), oversubscribing the cores.
        threads = torch.get_num_threads()
        worker_threads = max(1, threads // min(workers, len(groups) or 1))

        def in_worker(group: _Group) -> None:
            torch.set_num_threads(worker_threads)
            merge_group(group, writer)

        try:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lorm-merge") as pool:
                futures = [pool.submit(in_worker, group) for group in groups]
                try:
                    for future in futures:
                        future.result()
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
        finally:
            torch.set_num_threads(threads)  # the process-wide default that new threads start from

    try:
        if output is None:
            run(None)
        else:
            specs = {}  # every method writes rank r ('average' was checked to have it)
            for module, (out, _, width) in first.layout.items():
                key_b, key_a = factor_keys(module)
                specs[key_b], specs[key_a] = (first.dtype, (out, rank)), (first.dtype, (rank, width))
            for module, parameters in first.saved.items():  # as stored in the first adapter
                for parameter, (shape, dtype) in parameters.items():
                    specs[saved_key(module, parameter)] = (dtype, shape)
            with output:
                writer = StreamedSafetensors(output.tmp / WEIGHTS_NAME, specs, {"format": "pt"})
                try:
                    run(writer)
                finally:
                    writer.close()
                config = adapter_config(first.config, first.layout, rank, first.saved)
                (output.tmp / CONFIG_NAME).write_text(
                    json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
                )
                output.commit()
    finally:
        progress.close()
    return result
