"""Input checks that name the model layer and the problem. The mergers run them on a whole client
before touching any accumulator, so a rejected client leaves the state unchanged.

``check_gram`` / ``check_matrix`` check one tensor's structure (and, by default, its values);
``check_values`` checks the values of a whole client at once — one ``gram_stats`` call for all its Grams and
other tensors — which is what keeps validation cheap next to the merge itself."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from . import _C

OP_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # the native ops' floating inputs


class LayerError(ValueError):
    """A problem with the tensor sent for one model layer."""

    def __init__(self, layer: str, problem: str):
        super().__init__(f"layer {layer!r}: {problem}")
        self.layer = layer
        self.problem = problem


def check_layer_names(expected: Iterable[str], got: Mapping[str, object], what: str) -> None:
    """The same layer names as the earlier clients (or as the shared factors), or an error listing the difference."""
    if not isinstance(got, Mapping):
        raise ValueError(f"{what}: expected a dict of tensors keyed by layer name, got {type(got).__name__}")
    expected, names = set(expected), set(got)
    if names == expected:
        return
    missing, extra = sorted(expected - names), sorted(names - expected)
    parts = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else [])
    raise ValueError(f"{what}: layer names differ from the expected ones: " + "; ".join(parts))


def check_rank_fits(layer: str, rank: int, out_features: int, in_features: int) -> None:
    """A rank-r update of an out × in layer needs r ≤ min(out, in)."""
    if rank > min(out_features, in_features):
        raise LayerError(layer, f"rank {rank} exceeds the layer's size ({out_features} × {in_features})")


def check_matrix(
    layer: str, what: str, t: Tensor, shape: tuple[int | None, ...] | None = None, *, values: bool = True
) -> None:
    """A tensor of a dtype the ops read (``OP_DTYPES``) and the given shape (None matches any size); finite unless
    values=False."""
    if not isinstance(t, Tensor):
        raise LayerError(layer, f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise LayerError(layer, f"{what} must be floating point, got {t.dtype}")
    if t.dtype not in OP_DTYPES:
        raise LayerError(layer, f"{what} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if shape is not None and (t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape))):
        wanted = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise LayerError(layer, f"{what} has shape {tuple(t.shape)}, expected {wanted}")
    if values:
        check_values({}, [(layer, what, t)])


def symmetry_tolerance(dtype: torch.dtype) -> float:
    """The largest max |G − Gᵀ| accepted for a Gram of this dtype, relative to max diag(G): the native library's
    rule (csrc/checks.h), which psd_right_solve applies too."""
    return _C.symmetry_tolerance(dtype)


def check_gram(
    layer: str, gram: Tensor, width: int | None = None, diagonal: bool | None = None, *, values: bool = True
) -> None:
    """A Gram: (n, n) or (n,) diagonal; unless values=False also finite, symmetric, non-negative diagonal."""
    if not isinstance(gram, Tensor):
        raise LayerError(layer, f"gram must be a torch.Tensor, got {type(gram).__name__}")
    if gram.dim() not in (1, 2) or (gram.dim() == 2 and gram.shape[0] != gram.shape[1]):
        raise LayerError(layer, f"gram must be square (n, n) or a diagonal (n,), got shape {tuple(gram.shape)}")
    if diagonal is not None and (gram.dim() == 1) != diagonal:
        kinds = ("full", "diagonal") if diagonal else ("diagonal", "full")
        raise LayerError(layer, f"gram is {kinds[0]} but this layer's Grams are {kinds[1]}")
    check_matrix(layer, "gram", gram, values=False)
    if width is not None and gram.shape[0] != width:
        raise LayerError(layer, f"gram is for {gram.shape[0]} features, expected {width}")
    if values:
        check_values({layer: gram}, [])


# What each value problem of _C.first_value_problem (the rule, csrc/checks.h) says, given the tensor's name and
# the problem's value.
_VALUE_PROBLEMS = {
    "non_finite": lambda what, value: f"{what} contains NaN or Inf ({int(value)} entries)",
    "negative_diagonal": lambda what, value: "gram has a negative diagonal entry, so it is not a Gram matrix XᵀX",
    "asymmetric": lambda what, value: f"gram is not symmetric (max |G - Gᵀ| = {value:.3g})",
}


def check_values(grams: Mapping[str, Tensor], matrices: Iterable[tuple[str, str, Tensor]]) -> None:
    """The values of tensors whose structure was checked: every Gram finite, symmetric (to
    ``symmetry_tolerance``) with a non-negative diagonal; every (layer, what, tensor) of ``matrices`` finite.
    One native call checks them all (``_C.first_value_problem``, one ``gram_stats`` read per device); the first
    problem found is raised as a LayerError."""
    matrices = list(matrices)
    found = _C.first_value_problem(list(grams.values()), [t for _, _, t in matrices])
    if found is None:
        return
    index, problem, value = found
    if index < len(grams):
        layer, what = list(grams)[index], "gram"
    else:
        layer, what, _ = matrices[index - len(grams)]
    raise LayerError(layer, _VALUE_PROBLEMS[problem](what, value))
