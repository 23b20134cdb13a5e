"""Hugging Face PEFT LoRA adapters: read, write, collect their Grams, and merge N of them into one.

A PEFT adapter is a folder with ``adapter_config.json`` and ``adapter_model.safetensors``, whose keys are
``base_model.model.<module>.lora_A.weight`` (r × in) and ``...lora_B.weight`` (out × r); PEFT applies
ΔW = s · B A with s = lora_alpha / r, or lora_alpha / √r with ``use_rslora``, r and lora_alpha per module
when ``rank_pattern`` / ``alpha_pattern`` match it. Reading folds s into B in float64, so every factor pair
here is the plain update ΔW = B A; writing stores lora_alpha = r, i.e. s = 1.

Only plain LoRA on linear layers is accepted; every ``adapter_config.json`` field is either understood
(``_SCALING_FIELDS``, ``_TARGETING_FIELDS``, ``_MUST_AGREE_FIELDS``, ``_IGNORED_FIELDS``), required to be off
(``_OFF_VALUES``: DoRA, trained biases, modules_to_save, ...), or an error. See docs/peft.md.

Grams are safetensors files keyed by module name (the name inside the base model, e.g. ``layers.0.q_proj``),
each (in × in) or its diagonal (in); ``collect_grams`` makes them with ``GramCollector``.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .gram import GramCollector
from .merge import AdapterMerger
from .validation import LayerError, check_gram

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
_FACTOR_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<factor>[AB])\.weight")

# Give ΔW = s · B A its scaling: folded into B on reading.
_SCALING_FIELDS = {"r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern"}
# Say which modules carry LoRA; the saved keys already list them, and the output names them exactly.
_TARGETING_FIELDS = {"target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"}
# Describe the base model and how to load onto it: equal in every input, copied to the output.
_MUST_AGREE_FIELDS = {"peft_type", "task_type", "base_model_name_or_path", "revision", "fan_in_fan_out"}
# Training-time or bookkeeping only (lora_dropout is inactive at inference; the init_* configs only matter at
# initialisation, and the base-model-changing initialisations are refused below via init_lora_weights).
_IGNORED_FIELDS = {
    "auto_mapping",
    "inference_mode",
    "peft_version",
    "lora_dropout",
    "init_lora_weights",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "megatron_core",
    "qalora_group_size",
    "ensure_weight_tying",
    "runtime_config",
}
# Features whose saved weights or forward pass are not ΔW = s · B A on a linear layer: accepted only when off.
_OFF_VALUES = {
    "use_dora": (False, None),
    "bias": ("none", None),
    "lora_bias": (False, None),
    "modules_to_save": (None, []),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, [], {}),
    "layer_replication": (None, []),
    "megatron_config": (None, {}),
    "use_qalora": (False, None),
    "alora_invocation_tokens": (None, []),
    "use_bdlora": (None, False),
    "arrow_config": (None,),
    "kasa_config": (None,),
    "velora_config": (None,),
    "monteclora_config": (None,),
}
_KNOWN_FIELDS = _SCALING_FIELDS | _TARGETING_FIELDS | _MUST_AGREE_FIELDS | _IGNORED_FIELDS | set(_OFF_VALUES)
# These initialisations rewrite the base model's weights, so the saved factors are not an update of the base.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

MERGE_METHODS = ("exact", "alternating", "average", "svd")


class AdapterFileError(ValueError):
    """A problem with one input or output file, and the module it concerns when there is one."""

    def __init__(self, path: str | os.PathLike, problem: str, module: str | None = None):
        where = f"{path}: module {module!r}: " if module is not None else f"{path}: "
        super().__init__(where + problem)
        self.path, self.module, self.problem = str(path), module, problem


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter with its scaling folded in: ΔW = B A per module, factors in float64."""

    path: Path
    config: dict
    factors: dict[str, tuple[Tensor, Tensor]]  # module -> (B out × r, A r × in)
    dtype: torch.dtype  # as stored on disk

    @property
    def layout(self) -> dict[str, tuple[int, int, int]]:
        """{module: (out, r, in)}."""
        return {m: (b.shape[0], b.shape[1], a.shape[1]) for m, (b, a) in self.factors.items()}


def _pattern_value(patterns: Mapping[str, object], module: str, default):
    """PEFT's per-module override: the first pattern p with the module name matching (.*\\.)?(p) in full."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module):
            return value
    return default


def lora_scaling(config: Mapping, module: str) -> tuple[int, float]:
    """(r, s) that PEFT uses for ``module``: s = lora_alpha / r, or lora_alpha / √r with use_rslora."""
    rank = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    return rank, alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def check_lora_config(config: Mapping, path: str | os.PathLike) -> None:
    """Accept a plain LoRA adapter_config.json or raise AdapterFileError naming the field."""
    if not isinstance(config, Mapping):
        raise AdapterFileError(path, f"expected a JSON object, got {type(config).__name__}")
    unknown = sorted(set(config) - _KNOWN_FIELDS)
    if unknown:
        raise AdapterFileError(
            path, f"unknown config field(s) {unknown}: lorm_ext cannot tell whether they change ΔW = s·B A "
            "(written by a newer or older PEFT than the 0.21 field set lorm_ext knows?)"
        )
    if config.get("peft_type") != "LORA":
        raise AdapterFileError(path, f"peft_type is {config.get('peft_type')!r}, only LORA adapters can be merged")
    for field, off in _OFF_VALUES.items():
        if field in config and config[field] not in off:
            raise AdapterFileError(
                path, f"{field}={config[field]!r} is not supported (only plain LoRA factors are merged; "
                f"it must be {off[0]!r})"
            )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise AdapterFileError(
            path, f"init_lora_weights={init!r} changes the base model's weights, so the factors are not an "
            "update of the base model; save the adapter converted to plain LoRA "
            "(PEFT: save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    for field, kinds in (("r", int), ("lora_alpha", (int, float))):
        value = config.get(field)
        if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
            raise AdapterFileError(path, f"{field} must be a positive {'integer' if kinds is int else 'number'}, "
                                   f"got {value!r}")
    for field in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(field) or {}
        if not isinstance(patterns, Mapping):
            raise AdapterFileError(path, f"{field} must be a mapping of module patterns, got {patterns!r}")
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                raise AdapterFileError(path, f"{field} key {pattern!r} is not a regular expression: {err}") from None


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise AdapterFileError(path, "not found (a PEFT adapter folder has adapter_config.json)") from None
    except json.JSONDecodeError as err:
        raise AdapterFileError(path, f"invalid JSON: {err}") from None


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(path)
    except FileNotFoundError:
        raise AdapterFileError(path, "not found") from None
    except (SafetensorError, OSError) as err:
        raise AdapterFileError(path, f"cannot be read as safetensors: {err}") from None


def read_lora_adapter(adapter_dir: str | os.PathLike) -> LoraAdapter:
    """Load a PEFT LoRA adapter folder, check it, and fold each module's scaling into B."""
    adapter_dir = Path(adapter_dir)
    config_path, weights_path = adapter_dir / CONFIG_NAME, adapter_dir / WEIGHTS_NAME
    config = _read_json(config_path)
    check_lora_config(config, config_path)
    tensors = _read_safetensors(weights_path)
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        match = _FACTOR_KEY.fullmatch(key.removeprefix(KEY_PREFIX)) if key.startswith(KEY_PREFIX) else None
        if match is None:
            raise AdapterFileError(
                weights_path, f"unexpected key {key!r}: only {KEY_PREFIX}<module>.lora_A.weight / lora_B.weight "
                "of linear layers can be merged"
            )
        pairs.setdefault(match["module"], {})[match["factor"]] = tensor
    if not pairs:
        raise AdapterFileError(weights_path, "holds no LoRA factors")
    factors, dtypes = {}, set()
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            absent = "".join(sorted({"A", "B"} - set(pair)))
            raise AdapterFileError(weights_path, f"lora_{absent}.weight is missing", module)
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or not a.is_floating_point() or not b.is_floating_point():
            raise AdapterFileError(
                weights_path, f"lora_A {tuple(a.shape)} {a.dtype} and lora_B {tuple(b.shape)} {b.dtype} must be "
                "floating-point matrices (LoRA on a linear layer)", module
            )
        rank, scaling = lora_scaling(config, module)
        if a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterFileError(
                weights_path, f"rank mismatch: the config gives r={rank} but lora_A is {tuple(a.shape)} and "
                f"lora_B is {tuple(b.shape)}", module
            )
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise AdapterFileError(weights_path, "lora_A or lora_B contains NaN or Inf", module)
        factors[module] = (b.to(torch.float64) * scaling, a.to(torch.float64))
        dtypes.update((a.dtype, b.dtype))
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    return LoraAdapter(adapter_dir, config, factors, dtype)


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """write(temporary path) in path's folder, then os.replace: readers see the old file or the new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _check_not_an_input(outputs: Iterable[Path], inputs: Sequence[str | os.PathLike]) -> None:
    for out in outputs:
        # samefile also catches symlinks and hard links; an output that does not exist yet overwrites nothing.
        if out.exists() and any(Path(p).exists() and os.path.samefile(out, p) for p in inputs):
            raise AdapterFileError(out, "is one of the inputs; refusing to overwrite it (choose another output)")


def write_lora_adapter(
    output_dir: str | os.PathLike,
    factors: Mapping[str, tuple[Tensor, Tensor]],
    like: Mapping,
    *,
    dtype: torch.dtype = torch.float32,
    protect: Sequence[str | os.PathLike] = (),
) -> Path:
    """Write {module: (B, A)} (ΔW = B A) as a PEFT LoRA adapter with lora_alpha = r, so s = 1 exactly.

    The config keeps ``like``'s (an input's adapter_config.json) fields in ``_MUST_AGREE_FIELDS`` and names the
    modules exactly (target_modules is a full-match regex of their names). Each file is written to a
    temporary name and moved into place; ``protect`` lists input files that must not be overwritten.
    """
    output_dir = Path(output_dir)
    ranks = {b.shape[1] for b, _ in factors.values()}
    if len(ranks) != 1:
        raise ValueError(f"all modules of a written adapter must have one rank, got ranks {sorted(ranks)}")
    rank = ranks.pop()
    config_path, weights_path = output_dir / CONFIG_NAME, output_dir / WEIGHTS_NAME
    _check_not_an_input([config_path, weights_path], protect)
    config = {field: like[field] for field in sorted(_MUST_AGREE_FIELDS) if field in like}
    config.update(
        peft_type="LORA",
        r=rank,
        lora_alpha=rank,
        use_rslora=False,
        target_modules="|".join(f"(?:{re.escape(m)})" for m in sorted(factors)),
        bias="none",
        inference_mode=True,
    )
    tensors = {}
    for module, (b, a) in factors.items():
        tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = a.detach().to("cpu", dtype).contiguous()
        tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = b.detach().to("cpu", dtype).contiguous()
    output_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(weights_path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _atomic_write(config_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return output_dir


def read_grams(path: str | os.PathLike, widths: Mapping[str, int]) -> dict[str, Tensor]:
    """The Grams of the modules in ``widths`` ({module: in}) from a safetensors file keyed by module name;
    other keys are ignored. Each is (in × in) or a diagonal (in), finite, symmetric, non-negative diagonal."""
    grams = _read_safetensors(Path(path))
    missing = sorted(set(widths) - set(grams))
    if missing:
        raise AdapterFileError(path, f"has no Gram for module(s) {missing} (keys are module names, e.g. "
                               f"{sorted(widths)[0]!r})")
    out = {}
    for module, width in widths.items():
        try:
            check_gram(module, grams[module], width)
        except LayerError as err:
            raise AdapterFileError(path, err.problem, module) from None
        out[module] = grams[module]
    return out


def save_grams(path: str | os.PathLike, grams: Mapping[str, Tensor]) -> None:
    """Write {module: Gram} as safetensors, atomically."""
    tensors = {m: g.detach().to("cpu").contiguous() for m, g in grams.items()}
    _atomic_write(Path(path), lambda tmp: save_file(tensors, tmp))


def _forward(model: nn.Module, batch) -> None:
    if isinstance(batch, Tensor):
        model(batch)
    elif isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, Sequence):
        model(*batch)
    else:
        raise TypeError(f"a batch must be a Tensor, a mapping of keyword inputs or a sequence, got {type(batch)}")


def collect_grams(
    model: nn.Module,
    modules: Iterable[str],
    batches: Iterable,
    *,
    diagonal: bool = False,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """Σ XᵀX of the inputs of the named modules (names inside ``model``) over ``batches``, without gradients.

    A batch is passed as ``model(batch)`` (a Tensor), ``model(**batch)`` (a mapping) or ``model(*batch)``.
    For a PEFT model pass ``peft_model.get_base_model()``: its LoRA layers keep the base module names.
    """
    names = sorted(modules)
    collector = GramCollector(model, "^(?:" + "|".join(map(re.escape, names)) + ")$", diagonal=diagonal, dtype=dtype)
    missing = sorted(set(names) - set(collector.layers))
    if missing:
        raise ValueError(f"the model has no linear module named {missing}")
    with torch.no_grad(), collector:
        for batch in batches:
            _forward(model, batch)
    unreached = sorted(set(names) - set(collector.grams))
    if unreached:
        raise ValueError(f"no input reached module(s) {unreached}: no batches, or they bypass these modules")
    return dict(collector.grams)


@dataclass
class MergeResult:
    """The merged adapter of the chosen method and the objective Σ_k ‖X_k (ΔW − ΔW_k)ᵀ‖² of every method
    per module; ``objectives["zero"]`` scores ΔW = 0. A method that does not apply is absent (average with
    different ranks)."""

    factors: dict[str, tuple[Tensor, Tensor]]
    objectives: dict[str, dict[str, float]]  # method -> module -> objective


class _Baselines:
    """Streaming Σ_k B_k, Σ_k A_k (plain averaging, same ranks only) and Σ_k B_k A_k (PEFT's svd merge)."""

    def __init__(self):
        self.count = 0
        self.sum_b: dict[str, Tensor] | None = {}
        self.sum_a: dict[str, Tensor] = {}
        self.sum_delta: dict[str, Tensor] = {}

    def add(self, factors: Mapping[str, tuple[Tensor, Tensor]]) -> None:
        if self.sum_b is not None and self.count and any(
            b.shape != self.sum_b[m].shape for m, (b, _) in factors.items()
        ):
            self.sum_b = None  # ranks differ: averaging factors is undefined
        for module, (b, a) in factors.items():
            if self.sum_b is not None:
                self.sum_b[module] = self.sum_b.get(module, 0) + b
                self.sum_a[module] = self.sum_a.get(module, 0) + a
            self.sum_delta[module] = self.sum_delta.get(module, 0) + b @ a
        self.count += 1

    def average(self) -> dict[str, tuple[Tensor, Tensor]] | None:
        """B = mean B_k, A = mean A_k (FedAvg of the factors)."""
        if self.sum_b is None:
            return None
        return {m: (self.sum_b[m] / self.count, self.sum_a[m] / self.count) for m in self.sum_b}

    def svd(self, rank: int) -> dict[str, tuple[Tensor, Tensor]]:
        """Rank-r truncated SVD of mean_k ΔW_k, B = U S, A = Vᵀ: PEFT's add_weighted_adapter with
        combination_type="svd" and weights 1/N."""
        out = {}
        for module, total in self.sum_delta.items():
            U, S, Vh = torch.linalg.svd(total / self.count, full_matrices=False)
            out[module] = (U[:, :rank] * S[:rank], Vh[:rank])
        return out


def merge_lora_adapters(
    adapter_dirs: Sequence[str | os.PathLike],
    gram_files: Sequence[str | os.PathLike],
    rank: int,
    *,
    method: str = "exact",
    output_dir: str | os.PathLike | None = None,
    max_iters: int = 500,
    tol: float = 1e-12,
) -> MergeResult:
    """Merge PEFT LoRA adapters, adapter k with the Grams of its data (``gram_files[k]``), into one
    rank-``rank`` adapter minimising Σ_k ‖X_k (ΔW − ΔW_k)ᵀ‖²; every method is scored per module.

    Methods: "exact" (the closed-form rank-r optimum), "alternating" (LoRM's exact B- and A-steps),
    "average" (mean of the B_k and of the A_k; needs equal ranks, and ``rank`` equal to them) and "svd"
    (PEFT's add_weighted_adapter svd merge with weights 1/N). Adapters are read one at a time (memory does
    not grow with N). With ``output_dir`` the chosen method's adapter is written there (never over an input).
    """
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {MERGE_METHODS}")
    if len(adapter_dirs) == 0 or len(adapter_dirs) != len(gram_files):
        raise ValueError(f"give one Gram file per adapter: {len(adapter_dirs)} adapters, {len(gram_files)} Gram files")
    inputs = [p for d in adapter_dirs for p in (Path(d) / CONFIG_NAME, Path(d) / WEIGHTS_NAME)] + list(gram_files)
    if output_dir is not None:
        _check_not_an_input([Path(output_dir) / CONFIG_NAME, Path(output_dir) / WEIGHTS_NAME], inputs)

    merger, baselines = AdapterMerger(rank, validate=False), _Baselines()  # inputs are validated on reading
    first: LoraAdapter | None = None
    gram_kinds: dict[str, int] = {}
    for adapter_dir, gram_file in zip(adapter_dirs, gram_files):
        adapter = read_lora_adapter(adapter_dir)
        weights_path = adapter.path / WEIGHTS_NAME
        if first is None:
            first = adapter
            for module, (out, _, width) in adapter.layout.items():
                if rank > min(out, width):
                    raise AdapterFileError(weights_path, f"rank {rank} exceeds the layer's size {out} × {width}", module)
        else:
            _check_same_adapter_kind(first, adapter)
        grams = read_grams(gram_file, {m: width for m, (_, _, width) in adapter.layout.items()})
        for module, gram in grams.items():
            if gram_kinds.setdefault(module, gram.dim()) != gram.dim():
                kinds = {1: "diagonal", 2: "full"}
                raise AdapterFileError(gram_file, f"Gram is {kinds[gram.dim()]} but the first Gram file's is "
                                       f"{kinds[gram_kinds[module]]}", module)
        merger.add_client(
            {m: b for m, (b, _) in adapter.factors.items()}, {m: a for m, (_, a) in adapter.factors.items()}, grams
        )
        baselines.add(adapter.factors)

    candidates = {
        "exact": merger.merge("exact"),
        "alternating": merger.merge("alternating", max_iters=max_iters, tol=tol),
        "average": baselines.average(),
        "svd": baselines.svd(rank),
    }
    if method == "average":
        if candidates["average"] is None:
            raise ValueError("method 'average' needs adapters of equal ranks; these differ")
        average_ranks = sorted({b.shape[1] for b, _ in candidates["average"].values()})
        if average_ranks != [rank]:
            raise ValueError(f"method 'average' keeps the adapters' rank {average_ranks}; pass that rank")
    zero = {m: (torch.zeros(out, 1, dtype=torch.float64), torch.zeros(1, width, dtype=torch.float64))
            for m, (out, _, width) in first.layout.items()}
    objectives = {name: merger.objective(f) for name, f in candidates.items() if f is not None}
    objectives["zero"] = merger.objective(zero)
    if output_dir is not None:
        write_lora_adapter(output_dir, candidates[method], first.config, dtype=first.dtype, protect=inputs)
    return MergeResult(candidates[method], objectives)


def _check_same_adapter_kind(first: LoraAdapter, other: LoraAdapter) -> None:
    """Same modules, same layer shapes and the same base model as the first adapter; ranks may differ."""
    weights_path = other.path / WEIGHTS_NAME
    missing, extra = sorted(set(first.factors) - set(other.factors)), sorted(set(other.factors) - set(first.factors))
    if missing or extra:
        parts = ([f"lacks module(s) {missing}"] if missing else []) + ([f"has extra module(s) {extra}"] if extra else [])
        raise AdapterFileError(weights_path, " and ".join(parts) + f" compared with {first.path / WEIGHTS_NAME}")
    for module, (out, _, width) in other.layout.items():
        first_out, _, first_width = first.layout[module]
        if (out, width) != (first_out, first_width):
            raise AdapterFileError(
                weights_path, f"shape mismatch: ΔW is {out} × {width} here but {first_out} × {first_width} in "
                f"{first.path / WEIGHTS_NAME}", module
            )
    for field in sorted(_MUST_AGREE_FIELDS):
        if first.config.get(field) != other.config.get(field):
            raise AdapterFileError(
                other.path / CONFIG_NAME, f"{field}={other.config.get(field)!r} differs from "
                f"{first.config.get(field)!r} in {first.path / CONFIG_NAME}"
            )
