"""Shared fixtures: every test runs on each available device with fresh random inputs (the seed is printed,
and LORM_TEST_SEED=<seed> replays a failure)."""

from __future__ import annotations

import os

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Relative error allowed against a float64 computation from the same inputs, by accumulation dtype.
REL_TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def seed() -> int:
    value = int(os.environ.get("LORM_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(value)
    print(f"LORM_TEST_SEED={value}")
    return value


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
