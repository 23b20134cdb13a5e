"""Hugging Face PEFT LoRA adapters: read, write, collect their Grams, and merge N of them into one.

A PEFT adapter is a folder with ``adapter_config.json`` and ``adapter_model.safetensors``, whose keys are
``base_model.model.<module>.lora_A.weight`` (r × in) and ``...lora_B.weight`` (out × r); PEFT applies
ΔW = s · B A with s = lora_alpha / r, or lora_alpha / √r with ``use_rslora``, r and lora_alpha per module
when ``rank_pattern`` / ``alpha_pattern`` match it. Reading folds s into B in float64, so every factor pair
here is the plain update ΔW = B A; writing stores lora_alpha = r, i.e. s = 1.

Only plain LoRA on linear layers is accepted; every ``adapter_config.json`` field is either understood
(``_SCALING_FIELDS``, ``_TARGETING_FIELDS``, ``_MUST_AGREE_FIELDS``, ``_IGNORED_FIELDS``), required to be off
(``_OFF_VALUES``: DoRA, trained biases, ...), or — when ``peft`` is installed, which interprets the config with
its own ``LoraConfig`` — a field of that PEFT's LoraConfig left at its default (a feature not in use), or an
error. See docs/peft.md.

Adapters and Gram files are opened lazily (``AdapterFile``, ``GramFile``: the safetensors header first, each
module's tensors memory-mapped when asked for), so that ``lorm_ext.adapter_merge`` can stream module by module.
A Gram file stores one Gram per distinct layer input (q/k/v of a block share one), full, as its upper
triangle or as its diagonal, with an index from module names (the names inside the base model, e.g.
``layers.0.q_proj``) to Grams; ``collect_grams`` makes them with ``GramCollector``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from re import _parser

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .files import atomic_write, default_mode, fsync_folder
from .gram import GramCollector
from .validation import LayerError, check_gram, check_values, symmetry_tolerance

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
# Modules trained in full and saved whole (a classification head): read, merged (RegMean with their Grams,
# else the mean), written.
_SAVED_FIELDS = {"modules_to_save"}
_KNOWN_FIELDS = (
    _SCALING_FIELDS | _TARGETING_FIELDS | _MUST_AGREE_FIELDS | _IGNORED_FIELDS | _SAVED_FIELDS | set(_OFF_VALUES)
)
# These initialisations rewrite the base model's weights, so the saved factors are not an update of the base.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


class AdapterFileError(ValueError):
    """A problem with one input or output file, and the module it concerns when there is one."""

    def __init__(self, path: str | os.PathLike, problem: str, module: str | None = None):
        where = f"{path}: module {module!r}: " if module is not None else f"{path}: "
        super().__init__(where + problem)
        self.path, self.module, self.problem = str(path), module, problem


# ---------------------------------------------------------------------------------------------------------
# rank_pattern / alpha_pattern: PEFT's rule (peft.utils.other.get_pattern_key) with bounded work

# At most this many backtracking paths (choices of branches and repeat counts) for one pattern against one name.
_MAX_PATTERN_PATHS = 10**7
_REPEATS = (_parser.MAX_REPEAT, _parser.MIN_REPEAT, _parser.POSSESSIVE_REPEAT)
# Inside a repetition these make the number of ways to match grow exponentially with the name's length.
_NESTING = (*_REPEATS, _parser.BRANCH, _parser.GROUPREF_EXISTS)


def _pattern_paths(items, length: int) -> int | None:
    """An upper bound on the paths Python's backtracking matcher can take for a parsed pattern against a string
    of ``length`` characters, or None when a repetition holds another repetition or an alternation (the nested
    quantifiers of catastrophic backtracking, e.g. ``(a+)+``)."""
    paths = 1
    for op, av in items:
        if op is _parser.BRANCH:
            branches = [_pattern_paths(b, length) for b in av[1]]
            count = None if None in branches else sum(branches)
        elif op in _REPEATS:
            low, high, body = av
            inner = _pattern_paths(body, length)
            if inner is None:
                return None
            if high <= 1:
                count = inner + 1
            elif any(o in _NESTING for o, _ in _walk(body)):
                return None
            else:
                count = max(min(high, length) - min(low, length), 0) + 1
        elif op is _parser.GROUPREF_EXISTS:
            yes, no = (_pattern_paths(p, length) if p is not None else 1 for p in av[1:])
            count = None if yes is None or no is None else yes + no
        elif op in (_parser.SUBPATTERN, _parser.ATOMIC_GROUP, _parser.ASSERT, _parser.ASSERT_NOT):
            count = _pattern_paths(_children(op, av)[0], length)
        else:
            count = 1
        if count is None:
            return None
        paths *= max(count, 1)
    return paths


def _children(op, av) -> list:
    """The parsed subpatterns directly inside one item of a parsed pattern."""
    if op is _parser.BRANCH:
        return list(av[1])
    if op is _parser.GROUPREF_EXISTS:
        return [p for p in av[1:] if p is not None]
    if op is _parser.ATOMIC_GROUP:
        return [av]
    if op in (*_REPEATS, _parser.SUBPATTERN, _parser.ASSERT, _parser.ASSERT_NOT):
        return [av[-1]]
    return []


def _walk(items):
    """Every (op, av) of a parsed pattern, nested ones included."""
    for op, av in items:
        yield op, av
        for sub in _children(op, av):
            yield from _walk(sub)


def _parse_pattern(pattern: str, path, field: str):
    try:
        parsed = _parser.parse(pattern)
    except re.error as err:
        raise AdapterFileError(path, f"{field} key {pattern!r} is not a regular expression: {err}") from None
    if _pattern_paths(parsed, 1) is None:
        raise AdapterFileError(
            path,
            f"{field} key {pattern!r} nests repetitions (like (a+)+): matching it can take exponential time; "
            "write it without a repeated group that itself repeats or alternates",
        )
    return parsed


def _pattern_value(patterns: Mapping[str, object], module: str, default, path, field: str):
    """PEFT's per-module override: the value of the first pattern p with ``re.match(rf"(.*\\.)?({p})$", module)``,
    i.e. p matching in full the name or a suffix of it that starts after a dot. Matched suffix by suffix, each
    pattern's backtracking bounded by ``_MAX_PATTERN_PATHS`` (a pattern over the bound is an error)."""
    starts = [0] + [i + 1 for i, c in enumerate(module) if c == "."]
    for pattern, value in patterns.items():
        paths = _pattern_paths(_parse_pattern(pattern, path, field), len(module))
        if paths * len(starts) > _MAX_PATTERN_PATHS:
            raise AdapterFileError(
                path,
                f"{field} key {pattern!r} has too many repetitions and alternatives to match "
                f"{module!r} in bounded time (over {_MAX_PATTERN_PATHS:.0e} paths); simplify it",
            )
        compiled = re.compile(pattern)
        if any(compiled.fullmatch(module, start) for start in starts):
            return value
    return default


def lora_scaling(config: Mapping, module: str, path: str | os.PathLike = CONFIG_NAME) -> tuple[int, float]:
    """(r, s) that PEFT uses for ``module``: s = lora_alpha / r, or lora_alpha / √r with use_rslora."""
    rank = _pattern_value(config.get("rank_pattern") or {}, module, config["r"], path, "rank_pattern")
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"], path, "alpha_pattern")
    return rank, alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


# Larger lora_alpha values are no trained adapter's, and scaling factors by them can overflow float32.
_MAX_ALPHA = 1e6


def _check_rank(value, path, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AdapterFileError(path, f"{field} must be a positive integer, got {value!r}")


def _check_alpha(value, path, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= _MAX_ALPHA:
        raise AdapterFileError(path, f"{field} must be a finite number in (0, {_MAX_ALPHA:g}], got {value!r}")


@functools.cache
def _peft_lora_config() -> type | None:
    """The installed PEFT's ``LoraConfig`` class, or None without peft (the file-level field sets decide)."""
    try:
        from peft import LoraConfig
    except ImportError:
        return None
    return LoraConfig


def _check_fields_with_peft(lora_config: type, config: Mapping, path) -> None:
    """Interpret the config with PEFT's own LoraConfig (its checks run); a field lorm_ext does not know is
    accepted at that LoraConfig's default (the feature is not in use: PEFT adds features off by default), and
    one that neither knows is refused."""
    fields = {f.name: f for f in dataclasses.fields(lora_config)}
    unknown = sorted(set(config) - _KNOWN_FIELDS - set(fields))
    if unknown:
        raise AdapterFileError(
            path,
            f"unknown config field(s) {unknown}: neither lorm_ext nor the installed PEFT "
            f"{_peft_version()} knows them (saved by a newer PEFT? upgrade peft to read it)",
        )
    # runtime_config is runtime only (PEFT drops it on loading too); fields this PEFT predates follow lorm_ext's rules
    arguments = {k: v for k, v in config.items() if k in fields and k != "runtime_config"}
    try:
        interpreted = lora_config(**arguments)
    except (TypeError, ValueError) as err:
        raise AdapterFileError(path, f"PEFT {_peft_version()}'s LoraConfig refuses it: {err}") from None
    for name in sorted(set(config) - _KNOWN_FIELDS):
        field = fields[name]
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        if getattr(interpreted, name) != default:
            raise AdapterFileError(
                path,
                f"{name}={config[name]!r} is set (PEFT's default is {default!r}): lorm_ext merges only "
                "ΔW = s·B A and does not know whether this feature changes it",
            )


def _peft_version() -> str:
    import peft

    return peft.__version__


def check_lora_config(config: Mapping, path: str | os.PathLike) -> None:
    """Accept a plain LoRA adapter_config.json or raise AdapterFileError naming the field."""
    if not isinstance(config, Mapping):
        raise AdapterFileError(path, f"expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise AdapterFileError(path, f"peft_type is {config.get('peft_type')!r}, only LORA adapters can be merged")
    lora_config = _peft_lora_config()
    if lora_config is not None:
        _check_fields_with_peft(lora_config, config, path)
    else:
        unknown = sorted(set(config) - _KNOWN_FIELDS)
        if unknown:
            raise AdapterFileError(
                path,
                f"unknown config field(s) {unknown}: lorm_ext cannot tell whether they change ΔW = s·B A "
                "(saved by a newer PEFT than the 0.21 field set lorm_ext knows? with peft installed, fields a "
                "newer PEFT adds are read at their defaults)",
            )
    for field, off in _OFF_VALUES.items():
        if field in config and config[field] not in off:
            raise AdapterFileError(
                path,
                f"{field}={config[field]!r} is not supported (only plain LoRA factors are merged; "
                f"it must be {off[0]!r})",
            )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise AdapterFileError(
            path,
            f"init_lora_weights={init!r} changes the base model's weights, so the factors are not an "
            "update of the base model; save the adapter converted to plain LoRA "
            "(PEFT: save_pretrained(..., path_initial_model_for_weight_conversion=...))",
        )
    saved = config.get("modules_to_save")
    if saved is not None and (not isinstance(saved, list) or not all(isinstance(m, str) and m for m in saved)):
        raise AdapterFileError(path, f"modules_to_save must be a list of module names, got {saved!r}")
    _check_rank(config.get("r"), path, "r")
    _check_alpha(config.get("lora_alpha"), path, "lora_alpha")
    for field, check in (("rank_pattern", _check_rank), ("alpha_pattern", _check_alpha)):
        patterns = config.get(field) or {}
        if not isinstance(patterns, Mapping):
            raise AdapterFileError(path, f"{field} must be a mapping of module patterns, got {patterns!r}")
        for pattern, value in patterns.items():
            _parse_pattern(pattern, path, field)
            check(value, path, f"{field}[{pattern!r}]")


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise AdapterFileError(path, "not found (a PEFT adapter folder has adapter_config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(path, f"invalid JSON: {err}") from None


def _open_safetensors(path: Path):
    """A lazy (memory-mapped) safetensors handle; only the header is read here."""
    try:
        return safe_open(path, framework="pt")
    except FileNotFoundError:
        raise AdapterFileError(path, "not found") from None
    except (SafetensorError, OSError) as err:
        raise AdapterFileError(path, f"cannot be read as safetensors: {err}") from None


_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def _tensor_info(handle, key: str) -> tuple[tuple[int, ...], torch.dtype | str]:
    """(shape, torch dtype) from the header; the dtype's safetensors name when it is not floating point."""
    view = handle.get_slice(key)
    return tuple(view.get_shape()), _DTYPES.get(view.get_dtype(), view.get_dtype())


def _read_tensor(handle, path: Path, key: str, module: str | None, rows: slice | None = None) -> Tensor:
    try:
        return handle.get_tensor(key) if rows is None else handle.get_slice(key)[rows]
    except (SafetensorError, OSError) as err:
        raise AdapterFileError(path, f"tensor {key!r} cannot be read: {err}", module) from None


def _saved_module(name: str, entries: Sequence[str]) -> tuple[str, str] | None:
    """(module, parameter) of a tensor's name inside the model when it belongs to a ``modules_to_save`` entry:
    the module is the shortest prefix of the name that ends with an entry (PEFT's ``key.endswith(entry)``)."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        module = ".".join(parts[:i])
        if any(module.endswith(e) for e in entries):
            return module, ".".join(parts[i:])
    return None


class AdapterFile:
    """A PEFT LoRA adapter opened lazily: its checked config and, from the safetensors header, its layout;
    ``factors(module)`` reads one module's pair (memory-mapped) and folds the scaling into B in float64.
    ``saved`` describes the ``modules_to_save`` copies ({module: {parameter: (shape, dtype)}}), which
    ``saved_tensor`` reads."""

    def __init__(self, adapter_dir: str | os.PathLike):
        self.path = Path(adapter_dir)
        config_path, self.weights_path = self.path / CONFIG_NAME, self.path / WEIGHTS_NAME
        self.config = _read_json(config_path)
        check_lora_config(self.config, config_path)
        with _open_safetensors(self.weights_path) as handle:
            info = {key: _tensor_info(handle, key) for key in handle.keys()}
        pairs: dict[str, dict[str, str]] = {}
        self.saved: dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]] = {}
        entries = self.config.get("modules_to_save") or []
        for key in info:
            name = key.removeprefix(KEY_PREFIX) if key.startswith(KEY_PREFIX) else None
            match = _FACTOR_KEY.fullmatch(name) if name is not None else None
            saved = _saved_module(name, entries) if name is not None and match is None else None
            if saved is not None:
                shape, dtype = info[key]
                if not isinstance(dtype, torch.dtype):
                    raise AdapterFileError(
                        self.weights_path, f"modules_to_save tensor {key!r} is {dtype}, not floating point", saved[0]
                    )
                self.saved.setdefault(saved[0], {})[saved[1]] = (shape, dtype)
                continue
            if match is None:
                raise AdapterFileError(
                    self.weights_path,
                    f"unexpected key {key!r}: only {KEY_PREFIX}<module>.lora_A.weight / "
                    "lora_B.weight of linear layers and the modules_to_save copies can be merged",
                )
            pairs.setdefault(match["module"], {})[match["factor"]] = key
        if not pairs:
            raise AdapterFileError(self.weights_path, "holds no LoRA factors")
        self.keys: dict[str, tuple[str, str]] = {}  # module -> (lora_B key, lora_A key)
        self.layout: dict[str, tuple[int, int, int]] = {}  # module -> (out, r, in)
        self.scaling: dict[str, float] = {}
        dtypes = set()
        for module in sorted(pairs):
            pair = pairs[module]
            if set(pair) != {"A", "B"}:
                absent = "".join(sorted({"A", "B"} - set(pair)))
                raise AdapterFileError(self.weights_path, f"lora_{absent}.weight is missing", module)
            (a_shape, a_dtype), (b_shape, b_dtype) = (info[pair[f]] for f in "AB")
            if (
                len(a_shape) != 2
                or len(b_shape) != 2
                or not all(isinstance(d, torch.dtype) for d in (a_dtype, b_dtype))
            ):
                raise AdapterFileError(
                    self.weights_path,
                    f"lora_A {a_shape} {a_dtype} and lora_B {b_shape} {b_dtype} must be "
                    "floating-point matrices (LoRA on a linear layer)",
                    module,
                )
            rank, self.scaling[module] = lora_scaling(self.config, module, config_path)
            if a_shape[0] != rank or b_shape[1] != rank:
                raise AdapterFileError(
                    self.weights_path,
                    f"rank mismatch: the config gives r={rank} but lora_A is {a_shape} and lora_B is {b_shape}",
                    module,
                )
            self.keys[module] = (pair["B"], pair["A"])
            self.layout[module] = (b_shape[0], rank, a_shape[1])
            dtypes.update((a_dtype, b_dtype))
        self.dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32  # as stored on disk

    def saved_matrices(self) -> dict[str, tuple[int, int]]:
        """The ``modules_to_save`` copies with a 2-D weight, {module: its shape}: a linear head's (out, in) is
        merged with RegMean where the Gram files hold its Gram (an embedding's (num, dim) has none)."""
        return {
            m: params["weight"][0]
            for m, params in self.saved.items()
            if "weight" in params and len(params["weight"][0]) == 2
        }

    def saved_tensor(self, module: str, parameter: str, device: torch.device | str = "cpu") -> Tensor:
        """One parameter of a ``modules_to_save`` copy in float64 on ``device``; NaN or Inf is an error."""
        key = saved_key(module, parameter)
        with _open_safetensors(self.weights_path) as handle:
            t = _read_tensor(handle, self.weights_path, key, module)
        if not bool(torch.isfinite(t).all()):
            raise AdapterFileError(
                self.weights_path, f"modules_to_save tensor {parameter!r} contains NaN or Inf", module
            )
        return _to_device(t, device).double()

    def nbytes(self, module: str) -> int:
        out, rank, width = self.layout[module]
        return (out + width) * rank * self.dtype.itemsize

    def factors(self, module: str, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """(B · s, A) of one module in float64 on ``device``; NaN or Inf is an error naming file and module."""
        with _open_safetensors(self.weights_path) as handle:  # opened per read: no mapping outlives its use
            b, a = (_read_tensor(handle, self.weights_path, key, module) for key in self.keys[module])
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise AdapterFileError(self.weights_path, "lora_A or lora_B contains NaN or Inf", module)
        return _to_device(b, device).double() * self.scaling[module], _to_device(a, device).double()


def _to_device(t: Tensor, device) -> Tensor:
    """A host tensor on ``device``; to a GPU through pinned memory, so the copy overlaps work queued earlier."""
    device = torch.device(device)
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


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


def read_lora_adapter(adapter_dir: str | os.PathLike) -> LoraAdapter:
    """Load a whole PEFT LoRA adapter folder, check it, and fold each module's scaling into B."""
    adapter = AdapterFile(adapter_dir)
    factors = {m: adapter.factors(m) for m in adapter.layout}
    return LoraAdapter(adapter.path, adapter.config, factors, adapter.dtype)


# ---------------------------------------------------------------------------------------------------------
# Gram files

# Version 2 keeps its index in this safetensors metadata entry; a file without it is the first format.
GRAM_INDEX_KEY = "lorm_ext.grams"
GRAM_LAYOUTS = ("full", "triangle", "diagonal")
GRAM_STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Rows of a Gram folded per step: a panel of at most this many entries (32 MB in float64).
_PANEL_ENTRIES = 1 << 22


# Rows per panel of a stored triangle: its diagonal blocks are stored whole, 256 / n more than n(n+1)/2 entries.
TRIANGLE_PANEL_ROWS = 256


def triangle_entries(width: int, panel_rows: int = TRIANGLE_PANEL_ROWS) -> int:
    """Entries of a stored triangle of an n × n Gram: panel p holds rows pT..pT+T−1, columns pT..n−1."""
    return sum(min(panel_rows, width - s) * (width - s) for s in range(0, width, panel_rows))


@dataclass
class GramPanel:
    """Rows [start, stop) of one Gram G in float64. ``mirrored``: the panel holds columns start.. only (its
    diagonal block whole), and its columns stop.. stand for the lower part G[stop:, start:stop] too;
    otherwise it is the full rows."""

    start: int
    stop: int
    values: Tensor
    mirrored: bool


class GramFile:
    """A Gram file opened lazily. ``index`` maps each module to the stored Gram of its input (modules fed the
    same input share one), ``kinds`` each stored Gram to (layout, width).

    Format 2 (``save_grams``): one tensor per distinct input, its layout — "full" (n × n), "triangle" (the
    upper triangle in panels of T = ``panel_rows`` rows: panel p is rows pT..pT+T−1, columns pT..n−1, so about
    n(n + T)/2 entries) or "diagonal" (n) — and the module index in the JSON
    metadata entry ``GRAM_INDEX_KEY``; float32, bfloat16, float16 or float64. The first format (no index)
    is read too: each key a module, (n × n) full or (n) diagonal.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with _open_safetensors(self.path) as handle:
            info = {key: _tensor_info(handle, key) for key in handle.keys()}
            index_text = (handle.metadata() or {}).get(GRAM_INDEX_KEY)
        self.first_format = index_text is None
        if self.first_format:
            self.panel_rows = {}
            self.index = {key: key for key in info}
            self.kinds = {
                key: ("diagonal" if len(shape) == 1 else "full", shape[0] if shape else 0)
                for key, (shape, _) in info.items()
            }
        else:
            try:
                index = json.loads(index_text)
                self.index, self.kinds = (
                    dict(index["modules"]),
                    {k: (v["layout"], int(v["width"])) for k, v in index["grams"].items()},
                )
                self.panel_rows = {k: int(v.get("panel_rows", 0)) for k, v in index["grams"].items()}
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise AdapterFileError(
                    self.path, f"the {GRAM_INDEX_KEY!r} metadata is not a Gram index: {err!r}"
                ) from None
        self._info = info
        missing = sorted({g for g in self.index.values() if g not in self.kinds})
        if missing:
            raise AdapterFileError(self.path, f"the index points module(s) at Gram(s) {missing} it does not describe")

    def _check_stored(self, key: str, module: str) -> None:
        """The stored tensor has the shape of its layout and a Gram storage dtype (checked for used Grams only:
        a first-format file may hold other tensors)."""
        layout, width = self.kinds[key]
        if key not in self._info:
            raise AdapterFileError(self.path, f"the index names a Gram {key!r} that the file does not hold", module)
        shape, dtype = self._info[key]
        if layout == "triangle" and self.panel_rows.get(key, 0) < 1:
            raise AdapterFileError(self.path, f"triangle Gram {key!r} has no positive panel_rows in the index", module)
        triangle = (triangle_entries(width, self.panel_rows[key]),) if layout == "triangle" else None
        expected = {"full": (width, width), "triangle": triangle, "diagonal": (width,)}.get(layout)
        if expected is None:
            raise AdapterFileError(self.path, f"Gram {key!r} has an unknown layout {layout!r}", module)
        if shape != expected:
            raise AdapterFileError(
                self.path,
                f"gram must be square (n, n) or a diagonal (n,), got shape {shape}"
                if self.first_format
                else f"Gram {key!r} has shape {shape}, but a {layout} Gram of width {width} has {expected}",
                module,
            )
        if dtype not in GRAM_STORAGE_DTYPES:
            raise AdapterFileError(
                self.path,
                f"gram is {dtype}; Grams are stored as one of "
                f"{[str(d).removeprefix('torch.') for d in GRAM_STORAGE_DTYPES]}",
                module,
            )

    def check_modules(self, widths: Mapping[str, int]) -> None:
        """Every module of ``widths`` ({module: in}) has a Gram of that width."""
        missing = sorted(set(widths) - set(self.index))
        if missing:
            raise AdapterFileError(
                self.path, f"has no Gram for module(s) {missing} (keys are module names, e.g. {sorted(widths)[0]!r})"
            )
        for module, width in widths.items():
            self._check_stored(self.index[module], module)
            stored = self.kinds[self.index[module]][1]
            if stored != width:
                raise AdapterFileError(self.path, f"gram is for {stored} features, expected {width}", module)

    def is_diagonal(self, module: str) -> bool:
        return self.kinds[self.index[module]][0] == "diagonal"

    def nbytes(self, key: str) -> int:
        layout, width = self.kinds[key]
        entries = {"full": width * width, "diagonal": width}.get(layout) or triangle_entries(
            width, self.panel_rows[key]
        )
        return entries * self._info[key][1].itemsize

    def _problem(self, key: str, modules: Sequence[str], problem: str) -> AdapterFileError:
        return AdapterFileError(
            self.path, problem, modules[0] if len(modules) == 1 else f"{key} (input of {list(modules)})"
        )

    def diagonal(self, key: str, modules: Sequence[str]) -> Tensor:
        """A diagonal Gram, checked: finite and non-negative."""
        with _open_safetensors(self.path) as handle:
            g = _read_tensor(handle, self.path, key, modules[0])
        try:
            check_values({modules[0]: g}, [])
        except LayerError as err:
            raise self._problem(key, modules, err.problem) from None
        return g

    def panels(self, key: str, modules: Sequence[str]) -> Iterable[GramPanel]:
        """A full Gram as row panels in float64 (exact from every storage dtype), each checked: finite,
        non-negative diagonal; a "full" Gram is checked whole first, symmetry included, as ``check_gram``."""
        with _open_safetensors(self.path) as handle:  # opened per Gram: no mapping outlives its use
            yield from self._panels(handle, key, modules)

    def _panels(self, handle, key: str, modules: Sequence[str]) -> Iterable[GramPanel]:
        layout, width = self.kinds[key]
        step = max(1, min(width, _PANEL_ENTRIES // max(width, 1)))
        if layout == "full":
            gram = _read_tensor(handle, self.path, key, modules[0])
            try:
                check_gram(modules[0], gram, width)
            except LayerError as err:
                raise self._problem(key, modules, err.problem) from None
            for start in range(0, width, step):
                yield GramPanel(start, min(start + step, width), gram[start : start + step].double(), False)
            return
        rows = self.panel_rows[key]
        offset = 0
        for start in range(0, width, rows):
            stop = min(start + rows, width)
            size = (stop - start) * (width - start)
            values = _read_tensor(handle, self.path, key, modules[0], slice(offset, offset + size)).double()
            offset += size
            # a sum of float64 values read from float16/bfloat16/float32 cannot overflow: finite iff all are
            if not math.isfinite(values.sum()) and not bool(torch.isfinite(values).all()):
                raise self._problem(key, modules, f"gram contains NaN or Inf in rows {start}..{stop - 1}")
            values = values.view(stop - start, width - start)
            diagonal, block = values.diagonal(), values[:, : stop - start]
            if bool((diagonal < 0).any()):
                raise self._problem(key, modules, "gram has a negative diagonal entry, so it is not a Gram matrix XᵀX")
            asymmetry = float((block - block.mT).abs().max())
            if asymmetry > symmetry_tolerance(self._info[key][1]) * float(diagonal.max()):
                raise self._problem(
                    key, modules, f"gram is not symmetric (max |G - Gᵀ| = {asymmetry:.3g} in rows {start}..{stop - 1})"
                )
            yield GramPanel(start, stop, values, True)

    def dense(self, module: str) -> Tensor:
        """One module's Gram, (n × n) or (n), in its stored dtype (the in-memory API; merging streams panels)."""
        key = self.index[module]
        if self.is_diagonal(module):
            return self.diagonal(key, [module])
        width = self.kinds[key][1]
        gram = torch.zeros(width, width, dtype=torch.float64)
        for panel in self.panels(key, [module]):
            start, stop = panel.start, panel.stop
            gram[start:stop, -panel.values.shape[1] :] = panel.values
            if panel.mirrored:
                gram[stop:, start:stop] = panel.values[:, stop - start :].mT
        return gram.to(self._info[key][1])


def read_grams(path: str | os.PathLike, widths: Mapping[str, int]) -> dict[str, Tensor]:
    """The Grams of the modules in ``widths`` ({module: in}) from a Gram file (either format), dense in their
    stored dtype; other modules are ignored. Each is checked: finite, symmetric, non-negative diagonal. Modules
    that share an input get the same tensor object."""
    grams = GramFile(path)
    grams.check_modules(widths)
    by_key: dict[str, Tensor] = {}
    for module in widths:
        if grams.index[module] not in by_key:
            by_key[grams.index[module]] = grams.dense(module)
    return {module: by_key[grams.index[module]] for module in widths}


def save_grams(
    path: str | os.PathLike,
    grams: Mapping[str, Tensor],
    *,
    layout: str = "triangle",
    dtype: torch.dtype | None = None,
) -> None:
    """Write {module: Gram} as a Gram file (format 2, see ``GramFile``), atomically.

    Modules whose Gram is the same tensor object (``collect_grams`` gives q/k/v of a block one) share one
    stored Gram. Full Grams are stored as ``layout`` "triangle" (about half the size) or "full"; ``dtype`` (float32,
    bfloat16, float16 or float64; default: each Gram's own) is the storage dtype — bfloat16 halves the size
    again and reads back exactly into a float64 accumulator, but rounds the Gram to 8 significant bits.
    """
    if layout not in ("full", "triangle"):
        raise ValueError(f"layout must be 'full' or 'triangle', got {layout!r}")
    if dtype is not None and dtype not in GRAM_STORAGE_DTYPES:
        raise ValueError(f"Gram storage dtype must be one of {GRAM_STORAGE_DTYPES}, got {dtype}")
    keys: dict[int, str] = {}
    index, kinds, tensors = {}, {}, {}
    for module in sorted(grams):
        gram = grams[module]
        check_gram(module, gram)
        key = keys.setdefault(id(gram), module)
        index[module] = key
        if key != module:
            continue
        stored = gram.detach().to("cpu", dtype or gram.dtype)
        if not bool(torch.isfinite(stored).all()):
            raise LayerError(
                module, f"gram does not fit in {stored.dtype} (an entry overflows); store it in a wider dtype"
            )
        if gram.dim() == 1:
            kinds[key] = {"layout": "diagonal", "width": gram.shape[0]}
        elif layout == "triangle":
            width, rows = gram.shape[0], TRIANGLE_PANEL_ROWS
            kinds[key] = {"layout": "triangle", "width": width, "panel_rows": rows}
            stored = torch.cat([stored[s : s + rows, s:].reshape(-1) for s in range(0, width, rows)])
        else:
            kinds[key] = {"layout": "full", "width": gram.shape[0]}
        tensors[key] = stored.contiguous()
    metadata = {GRAM_INDEX_KEY: json.dumps({"version": 2, "modules": index, "grams": kinds}, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


# ---------------------------------------------------------------------------------------------------------
# Writing: adapters streamed into a temporary folder renamed into place (single files: files.atomic_write)


def check_output_file(path: str | os.PathLike) -> Path:
    """A file that can be written: not a folder, and its folder exists and is writable. One-line errors."""
    path = Path(path)
    if path.is_dir():
        raise AdapterFileError(path, "is a folder; give a file name")
    parent = path.parent
    if not parent.is_dir():
        raise AdapterFileError(
            path, f"its folder {parent} does not exist" if not parent.exists() else f"{parent} is not a folder"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise AdapterFileError(path, f"its folder {parent} is not writable")
    return path


class OutputFolder:
    """Where a merged adapter goes: checked before any work (never an input, never a file, a writable place),
    written into a temporary folder beside it, and renamed into place by ``commit``; leaving the ``with``
    block with an error removes the temporary folder, so the target is either untouched or complete.

    An existing target is replaced only when it holds nothing but a PEFT adapter's two files."""

    def __init__(self, target: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()):
        self.target = Path(os.path.abspath(target))
        resolved = self.target.resolve()
        for p in inputs:
            p = Path(p).resolve()
            if p == resolved or resolved in p.parents:
                raise AdapterFileError(
                    self.target, f"holds the input {p}; refusing to overwrite it (choose another output)"
                )
        if self.target.exists() or self.target.is_symlink():
            if not self.target.is_dir():
                raise AdapterFileError(
                    self.target, "exists and is not a folder; choose a folder for the merged adapter"
                )
            others = sorted(p.name for p in self.target.iterdir() if p.name not in (CONFIG_NAME, WEIGHTS_NAME))
            if others:
                raise AdapterFileError(
                    self.target, f"exists and holds other files than a PEFT adapter ({others[:3]}); choose a new folder"
                )
            self.target = resolved
        ancestor = self.target.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise AdapterFileError(self.target, f"cannot be created: {ancestor} is a file, not a folder")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise AdapterFileError(self.target, f"cannot be created: {ancestor} is not writable")
        self.tmp: Path | None = None

    def __enter__(self) -> OutputFolder:
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(dir=self.target.parent, prefix=f".{self.target.name}.", suffix=".tmp"))
            os.chmod(self.tmp, default_mode(0o777))
        except OSError as err:
            raise AdapterFileError(self.target, f"cannot be created: {err.strerror}") from None
        return self

    def commit(self) -> None:
        for name in os.listdir(self.tmp):
            with open(self.tmp / name, "rb") as f:
                os.fsync(f.fileno())
        fsync_folder(self.tmp)
        if self.target.exists():
            old = Path(tempfile.mkdtemp(dir=self.target.parent, prefix=f".{self.target.name}.", suffix=".old"))
            os.replace(self.target, old)  # old is an empty folder: rename over it is allowed
            os.replace(self.tmp, self.target)
            shutil.rmtree(old)
        else:
            os.replace(self.tmp, self.target)
        fsync_folder(self.target.parent)
        self.tmp = None

    def __exit__(self, *exc) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


class StreamedSafetensors:
    """A safetensors file whose header is written first (every tensor's name, dtype and shape known) and whose
    tensors are written at their offsets as they are ready, from any thread: only one tensor is in memory."""

    def __init__(
        self,
        path: str | os.PathLike,
        specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
    ):
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        self._offsets, offset = {}, 0
        for key in sorted(specs):
            dtype, shape = specs[key]
            size = math.prod(shape) * dtype.itemsize
            header[key] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._offsets[key] = (offset, size, dtype, tuple(shape))
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self._data_start = 8 + len(text)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self._fd, len(text).to_bytes(8, "little") + text, 0)
        os.ftruncate(self._fd, self._data_start + offset)

    def write(self, key: str, tensor: Tensor) -> None:
        offset, size, dtype, shape = self._offsets[key]
        data = tensor.detach().to("cpu", dtype).contiguous()
        if tuple(data.shape) != shape:
            raise ValueError(f"{key}: shape {tuple(data.shape)}, the header says {shape}")
        view = memoryview(data.reshape(-1).view(torch.uint8).numpy())
        while view:
            written = os.pwrite(self._fd, view, self._data_start + offset)
            view, offset = view[written:], offset + written

    def close(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)


def adapter_config(like: Mapping, modules: Iterable[str], rank: int, saved: Iterable[str] = ()) -> dict:
    """The adapter_config.json of a merged adapter: ``like``'s ``_MUST_AGREE_FIELDS``, lora_alpha = r (s = 1),
    target_modules a full-match regex of exactly ``modules`` and modules_to_save exactly ``saved``."""
    config = {field: like[field] for field in sorted(_MUST_AGREE_FIELDS) if field in like}
    if saved:
        config["modules_to_save"] = sorted(saved)
    config.update(
        peft_type="LORA",
        r=rank,
        lora_alpha=rank,
        use_rslora=False,
        target_modules="|".join(f"(?:{re.escape(m)})" for m in sorted(modules)),
        bias="none",
        inference_mode=True,
    )
    return config


def factor_keys(module: str) -> tuple[str, str]:
    """The safetensors keys of a module's (lora_B, lora_A)."""
    return f"{KEY_PREFIX}{module}.lora_B.weight", f"{KEY_PREFIX}{module}.lora_A.weight"


def saved_key(module: str, parameter: str) -> str:
    """The safetensors key of one parameter of a ``modules_to_save`` copy."""
    return f"{KEY_PREFIX}{module}.{parameter}"


def write_lora_adapter(
    output_dir: str | os.PathLike,
    factors: Mapping[str, tuple[Tensor, Tensor]],
    like: Mapping,
    *,
    dtype: torch.dtype = torch.float32,
    protect: Sequence[str | os.PathLike] = (),
) -> Path:
    """Write {module: (B, A)} (ΔW = B A) as a PEFT LoRA adapter folder with lora_alpha = r, so s = 1 exactly,
    atomically (``OutputFolder``); ``protect`` lists input files that must not be overwritten."""
    ranks = {b.shape[1] for b, _ in factors.values()}
    if len(ranks) != 1:
        raise ValueError(f"all modules of a written adapter must have one rank, got ranks {sorted(ranks)}")
    rank = ranks.pop()
    output = OutputFolder(output_dir, protect)
    specs = {}
    for module, (b, a) in factors.items():
        key_b, key_a = factor_keys(module)
        specs[key_b], specs[key_a] = (dtype, tuple(b.shape)), (dtype, tuple(a.shape))
    with output:
        writer = StreamedSafetensors(output.tmp / WEIGHTS_NAME, specs, {"format": "pt"})
        try:
            for module, (b, a) in factors.items():
                key_b, key_a = factor_keys(module)
                writer.write(key_b, b)
                writer.write(key_a, a)
        finally:
            writer.close()
        text = json.dumps(adapter_config(like, factors, rank), indent=2, sort_keys=True) + "\n"
        (output.tmp / CONFIG_NAME).write_text(text, encoding="utf-8")
        output.commit()
    return output.target


# ---------------------------------------------------------------------------------------------------------
# Collecting Grams


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
    share_inputs: bool = True,
    mask_key: str | None = "attention_mask",
) -> dict[str, Tensor]:
    """Σ XᵀX of the inputs of the named modules (names inside ``model``) over ``batches``, without gradients.

    A batch is passed as ``model(batch)`` (a Tensor), ``model(**batch)`` (a mapping) or ``model(*batch)``.
    A mapping batch's ``batch[mask_key]`` (a Hugging Face tokenizer's ``attention_mask``: 1 for real tokens,
    0 for padding), when present, is the token mask: padded positions add nothing (``GramCollector.token_mask``);
    ``mask_key=None`` counts every position.
    For a PEFT model pass ``peft_model.get_base_model()``: its LoRA layers keep the base module names.
    With ``share_inputs`` modules fed the same input tensor (q/k/v of a block) get one Gram: the same tensor
    object, which ``save_grams`` stores once.
    """
    names = sorted(modules)
    collector = GramCollector(
        model,
        "^(?:" + "|".join(map(re.escape, names)) + ")$",
        diagonal=diagonal,
        dtype=dtype,
        share_inputs=share_inputs,
    )
    missing = sorted(set(names) - set(collector.layers))
    if missing:
        raise ValueError(f"the model has no linear module named {missing}")
    with torch.no_grad(), collector:
        for batch in batches:
            mask = batch.get(mask_key) if mask_key is not None and isinstance(batch, Mapping) else None
            with collector.token_mask(mask):
                _forward(model, batch)
    unreached = sorted(set(names) - set(collector.grams))
    if unreached:
        raise ValueError(f"no input reached module(s) {unreached}: no batches, or they bypass these modules")
    return dict(collector.grams)
