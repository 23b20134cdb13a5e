"""Shared fixtures: every test runs on each available device with fresh random inputs (the seed is printed,
and LORM_TEST_SEED=<seed> replays a failure). Helpers the tests import live in lorm_testing.py."""

from __future__ import annotations

import os

import pytest
import torch
from lorm_testing import DEVICES


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def seed() -> int:
    value = int(os.environ.get("LORM_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(value)
    print(f"LORM_TEST_SEED={value}")
    return value


@pytest.fixture(autouse=True)
def cpu_backend_flags():
    """lorm-fcil's main() switches oneDNN off in its process (fcil/environment.pin_cpu_kernels); tests that call
    it in-process must not leave that to later tests, whose subprocesses (Ray workers) start with it on."""
    mkldnn = torch.backends.mkldnn.enabled
    yield
    torch.backends.mkldnn.enabled = mkldnn
