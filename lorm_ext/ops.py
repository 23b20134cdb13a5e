"""Typed wrappers of the native ops ``torch.ops.lorm_ext.*`` and their fake (meta) kernels for torch.compile.

The ops check shapes, dtypes and devices themselves and name the offending list entry; the mergers and the
Gram collector check first and name the model layer. ``lorm_ext.reference`` is the specification.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loading the library registers the ops)
from .reference import DEFAULT_RCOND

_ops = torch.ops.lorm_ext


def compiled_with_cuda() -> bool:
    """Whether the CUDA implementations were compiled into this build of lorm_ext._C."""
    return _C.compiled_with_cuda()


def gram_accumulate_(grams: Sequence[Tensor], inputs: Sequence[Tensor]) -> None:
    """grams[i] += inputs[i]ᵀ inputs[i] in place, for many layers in one call.

    inputs[i] is (..., n) in float16/bfloat16/float32/float64, flattened to (tokens, n) and upcast on the fly
    to the Gram's dtype (float32 or float64). A 1-D Gram of length n accumulates only the diagonal.
    """
    _ops.gram_accumulate_(list(grams), [x.detach() for x in inputs])


def gram_weighted_accumulate_(
    gram_sums: Sequence[Tensor],
    weighted_sums: Sequence[Tensor],
    grams: Sequence[Tensor],
    factors: Sequence[Tensor],
    lefts: Sequence[Tensor] | None = None,
) -> None:
    """gram_sums[i] += grams[i] and weighted_sums[i] += [lefts[i] @] factors[i] @ grams[i], in place.

    Reads each client Gram once. Sums are float32 or float64; the rest is upcast to the sums' dtype.
    """
    _ops.gram_weighted_accumulate_(
        list(gram_sums),
        list(weighted_sums),
        [g.detach() for g in grams],
        [f.detach() for f in factors],
        [m.detach() for m in lefts] if lefts is not None else [],
    )


def projected_accumulate_(
    projection_sums: Sequence[Tensor],
    weighted_sums: Sequence[Tensor],
    grams: Sequence[Tensor],
    shared_factors: Sequence[Tensor],
    factors: Sequence[Tensor],
) -> None:
    """P = A G Aᵀ per layer (A = shared_factors[i]); projection_sums[i] += P, weighted_sums[i] += factors[i] @ P."""
    _ops.projected_accumulate_(
        list(projection_sums),
        list(weighted_sums),
        [g.detach() for g in grams],
        [a.detach() for a in shared_factors],
        [b.detach() for b in factors],
    )


def gram_stats(grams: Sequence[Tensor]) -> Tensor:
    """Validation statistics of many Grams in one read of each: (len(grams), 4) float64, per Gram
    [max |G_ij − G_ji|, min diag(G), max diag(G), number of non-finite entries].

    Non-finite entries are left out of the other three. A 1-D Gram is a diagonal: its asymmetry is 0. No Grams:
    a (0, 4) tensor (the native op needs at least one to pick a device).
    """
    if not grams:
        return torch.empty(0, 4, dtype=torch.float64)
    return _ops.gram_stats([g.detach() for g in grams])


def psd_right_solve(rhs: Tensor, gram: Tensor, rcond: float = DEFAULT_RCOND) -> Tensor:
    """rhs @ pinv(gram) for symmetric PSD Grams, batched: rhs (..., m, n) with gram (..., n, n), or diagonal
    Grams as (..., 1, n) or (..., n) (the latter refused where it could also read as one full Gram).

    Computed in the Gram's dtype. Same result as ``rhs @ torch.pinverse(gram, rcond)`` (see reference.py): a
    Cholesky solve where the Gram is numerically positive definite and rcond is at most 1e-15, an
    eigendecomposition pseudo-inverse otherwise. A full Gram must be symmetric (``symmetry_tolerance``) and
    finite; rcond finite and >= 0.
    """
    return _ops.psd_right_solve(rhs, gram, rcond)


def _check_one_device(op: str, *tensor_lists) -> None:
    """The dispatcher runs these fake kernels for any call with a meta tensor: one with real tensors among them
    (which would otherwise do nothing, silently) is an error."""
    devices = {t.device for tensors in tensor_lists for t in tensors}
    if len(devices) > 1:
        raise RuntimeError(f"lorm_ext::{op}: tensors on several devices ({sorted(map(str, devices))}); all must be on one")


@torch.library.register_fake("lorm_ext::gram_accumulate_")
def _gram_accumulate_fake(grams, inputs):
    _check_one_device("gram_accumulate_", grams, inputs)


@torch.library.register_fake("lorm_ext::gram_weighted_accumulate_")
def _gram_weighted_accumulate_fake(gram_sums, weighted_sums, grams, factors, lefts):
    _check_one_device("gram_weighted_accumulate_", gram_sums, weighted_sums, grams, factors, lefts)


@torch.library.register_fake("lorm_ext::projected_accumulate_")
def _projected_accumulate_fake(projection_sums, weighted_sums, grams, shared_factors, factors):
    _check_one_device("projected_accumulate_", projection_sums, weighted_sums, grams, shared_factors, factors)


@torch.library.register_fake("lorm_ext::gram_stats")
def _gram_stats_fake(grams):
    _check_one_device("gram_stats", grams)
    device = grams[0].device if grams else None
    return torch.empty(len(grams), 4, dtype=torch.float64, device=device)


@torch.library.register_fake("lorm_ext::psd_right_solve")
def _psd_right_solve_fake(rhs, gram, rcond):
    _check_one_device("psd_right_solve", [rhs, gram])
    return rhs.new_empty(rhs.shape, dtype=gram.dtype)
