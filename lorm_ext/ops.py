"""Typed wrappers of the native ops ``torch.ops.lorm_ext.*`` and their fake (meta) kernels for torch.compile.

The ops check shapes, dtypes and devices themselves and name the offending list entry; the mergers check
first and name the model layer. ``lorm_ext.reference`` is the specification.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from ._install import load_extension
from .reference import DEFAULT_RCOND

# Loading the library registers the ops; one built against another torch is an ImportError saying how to rebuild.
_C = load_extension()
_ops = torch.ops.lorm_ext


def compiled_with_cuda() -> bool:
    """Whether the CUDA implementations were compiled into this build of lorm_ext._C."""
    return _C.compiled_with_cuda()


def cuda_kernels() -> str:
    """Which CUDA implementation the ops run: ``"aten"`` (compositions of ATen ops: cuBLAS, a few reductions;
    the default) or ``"custom"`` (the kernels of csrc/cuda/). Chosen by the environment variable
    ``LORM_EXT_CUDA_KERNELS``, read once; an invalid value raises ValueError here and at every CUDA op call."""
    if not compiled_with_cuda():
        raise RuntimeError("lorm_ext was built without its CUDA implementations (see LORM_EXT_CUDA in README.md)")
    return _C.cuda_kernels()


@contextmanager
def use_cuda_kernels(name: str) -> Iterator[None]:
    """Run the CUDA ops with implementation ``name`` (``"aten"`` or ``"custom"``) inside the block, for the
    whole process; the choice before is restored afterwards. For tests and benchmarks that compare the two."""
    previous = cuda_kernels()
    _C.set_cuda_kernels(name)
    try:
        yield
    finally:
        _C.set_cuda_kernels(previous)


def _detached(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The ops have no autograd formula: tensors that require grad go in detached (the others as they are, since
    a detach per tensor costs as much as a small layer's work)."""
    return [t.detach() if t.requires_grad else t for t in tensors]


def gram_accumulate_(grams: Sequence[Tensor], inputs: Sequence[Tensor]) -> None:
    """grams[i] += inputs[i]ᵀ inputs[i] in place, for many layers in one call.

    inputs[i] is (..., n) in float16/bfloat16/float32/float64, flattened to (tokens, n) and upcast on the fly
    to the Gram's dtype (float32 or float64). A 1-D Gram of length n accumulates only the diagonal.
    """
    _ops.gram_accumulate_(list(grams), _detached(inputs))


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
        _detached(grams),
        _detached(factors),
        _detached(lefts) if lefts is not None else [],
    )


def projected_accumulate_(
    projection_sums: Sequence[Tensor],
    weighted_sums: Sequence[Tensor],
    grams: Sequence[Tensor],
    shared_a: Sequence[Tensor],
    factors_b: Sequence[Tensor],
) -> None:
    """P = A G Aᵀ per layer (A = shared_a[i]); projection_sums[i] += P, weighted_sums[i] += factors_b[i] @ P."""
    _ops.projected_accumulate_(
        list(projection_sums),
        list(weighted_sums),
        _detached(grams),
        _detached(shared_a),
        _detached(factors_b),
    )


def gram_stats(grams: Sequence[Tensor]) -> Tensor:
    """Validation statistics of many Grams in one read of each: (len(grams), 4) float64, per Gram
    [max |G_ij − G_ji|, min diag(G), max diag(G), number of non-finite entries].

    Non-finite entries are left out of the other three. A 1-D Gram is a diagonal: its asymmetry is 0. No Grams:
    a (0, 4) tensor (the native op needs at least one to pick a device).
    """
    if not grams:
        return torch.empty(0, 4, dtype=torch.float64)
    return _ops.gram_stats(_detached(grams))


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
        raise RuntimeError(
            f"lorm_ext::{op}: tensors on several devices ({sorted(map(str, devices))}); all must be on one"
        )


def _check_shape(op: str, ok: bool, message) -> None:
    """Shape checks of the fake kernels, so that torch.compile reports a bad call while tracing (the native ops
    check the same at run time)."""
    torch._check(ok, lambda: f"lorm_ext::{op}: {message()}")


def _check_grams(op: str, name: str, grams) -> None:
    for i, g in enumerate(grams):
        _check_shape(
            op,
            g.dim() == 1 or (g.dim() == 2 and g.shape[0] == g.shape[1]),
            lambda: f"{name}[{i}] must be a square (n, n) Gram or a diagonal (n,), got shape {tuple(g.shape)}",
        )


@torch.library.register_fake("lorm_ext::gram_accumulate_")
def _gram_accumulate_fake(grams, inputs):
    op = "gram_accumulate_"
    _check_one_device(op, grams, inputs)
    _check_shape(op, len(inputs) == len(grams), lambda: f"inputs has {len(inputs)} entries, expected {len(grams)}")
    _check_grams(op, "grams", grams)
    for i, (g, x) in enumerate(zip(grams, inputs)):
        _check_shape(
            op,
            x.dim() >= 1 and x.shape[-1] == g.shape[0],
            lambda: f"inputs[{i}] has {x.shape[-1] if x.dim() else 0} features but grams[{i}] is for {g.shape[0]}",
        )


@torch.library.register_fake("lorm_ext::gram_weighted_accumulate_")
def _gram_weighted_accumulate_fake(gram_sums, weighted_sums, grams, factors, lefts):
    op = "gram_weighted_accumulate_"
    _check_one_device(op, gram_sums, weighted_sums, grams, factors, lefts)
    for name, tensors in (("weighted_sums", weighted_sums), ("grams", grams), ("factors", factors)):
        _check_shape(
            op, len(tensors) == len(gram_sums), lambda: f"{name} has {len(tensors)} entries, expected {len(gram_sums)}"
        )
    _check_shape(op, len(lefts) in (0, len(gram_sums)), lambda: f"lefts must be empty or have {len(gram_sums)} entries")
    _check_grams(op, "gram_sums", gram_sums)
    for i, (s, w, g, f) in enumerate(zip(gram_sums, weighted_sums, grams, factors)):
        n = s.shape[0]
        _check_shape(
            op,
            g.shape == s.shape,
            lambda: f"grams[{i}] has shape {list(g.shape)} but gram_sums[{i}] has {list(s.shape)}",
        )
        _check_shape(
            op, f.dim() == 2 and f.shape[1] == n, lambda: f"factors[{i}] must be (p, {n}), got {list(f.shape)}"
        )
        rows = lefts[i].shape[0] if lefts else f.shape[0]
        _check_shape(
            op,
            w.dim() == 2 and tuple(w.shape) == (rows, n),
            lambda: f"weighted_sums[{i}] must be ({rows}, {n}), got {list(w.shape)}",
        )


@torch.library.register_fake("lorm_ext::projected_accumulate_")
def _projected_accumulate_fake(projection_sums, weighted_sums, grams, shared_a, factors_b):
    op = "projected_accumulate_"
    _check_one_device(op, projection_sums, weighted_sums, grams, shared_a, factors_b)
    for name, tensors in (
        ("weighted_sums", weighted_sums),
        ("grams", grams),
        ("shared_a", shared_a),
        ("factors_b", factors_b),
    ):
        _check_shape(
            op,
            len(tensors) == len(projection_sums),
            lambda: f"{name} has {len(tensors)} entries, expected {len(projection_sums)}",
        )
    _check_grams(op, "grams", grams)
    for i, (p, w, g, a, b) in enumerate(zip(projection_sums, weighted_sums, grams, shared_a, factors_b)):
        n, r = g.shape[0], a.shape[0] if a.dim() == 2 else -1
        _check_shape(
            op, a.dim() == 2 and a.shape[1] == n, lambda: f"shared_a[{i}] must be (r, {n}), got {list(a.shape)}"
        )
        _check_shape(
            op, b.dim() == 2 and b.shape[1] == r, lambda: f"factors_b[{i}] must be (m, {r}), got {list(b.shape)}"
        )
        _check_shape(
            op, tuple(p.shape) == (r, r), lambda: f"projection_sums[{i}] must be ({r}, {r}), got {list(p.shape)}"
        )
        _check_shape(
            op,
            tuple(w.shape) == (b.shape[0], r),
            lambda: f"weighted_sums[{i}] must be ({b.shape[0]}, {r}), got {list(w.shape)}",
        )


@torch.library.register_fake("lorm_ext::gram_stats")
def _gram_stats_fake(grams):
    _check_one_device("gram_stats", grams)
    _check_grams("gram_stats", "grams", grams)
    device = grams[0].device if grams else None
    return torch.empty(len(grams), 4, dtype=torch.float64, device=device)


@torch.library.register_fake("lorm_ext::psd_right_solve")
def _psd_right_solve_fake(rhs, gram, rcond):
    _check_one_device("psd_right_solve", [rhs, gram])
    _check_shape(
        "psd_right_solve",
        rhs.dim() >= 2 and gram.dim() >= 1 and rhs.shape[-1] == gram.shape[-1],
        lambda: (
            f"rhs {list(rhs.shape)} must be (..., m, n) for a gram of {gram.shape[-1] if gram.dim() else 0} features"
        ),
    )
    return rhs.new_empty(rhs.shape, dtype=gram.dtype)
