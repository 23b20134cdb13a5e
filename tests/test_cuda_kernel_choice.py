"""LORM_EXT_CUDA_KERNELS and ops.use_cuda_kernels: which CUDA implementation the ops run (csrc/cuda/aten_ops.h).

These need a CUDA build of lorm_ext but no GPU. The variable is read once per process, so each value gets a
fresh interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorm_ext import ops

pytestmark = pytest.mark.skipif(not ops.compiled_with_cuda(), reason="needs a CUDA build of lorm_ext")

ROOT = Path(__file__).resolve().parents[1]

# Prints the choice, or the error a CUDA op call and ops.cuda_kernels() raise for it.
PROBE = """
import torch
from lorm_ext import ops
try:
    print(ops.cuda_kernels())
except ValueError as error:
    print("ValueError:", error)
if torch.cuda.is_available():
    try:
        ops.gram_accumulate_([torch.zeros(2, 2, device="cuda")], [torch.ones(3, 2, device="cuda")])
        print("op ran")
    except RuntimeError as error:
        print("RuntimeError:", str(error).splitlines()[0])
"""


def probe(value: str | None) -> list[str]:
    env = {key: v for key, v in os.environ.items() if key != "LORM_EXT_CUDA_KERNELS"}
    if value is not None:
        env["LORM_EXT_CUDA_KERNELS"] = value
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True
    )
    return done.stdout.splitlines()


@pytest.mark.parametrize(("value", "expected"), [(None, "aten"), ("", "aten"), ("aten", "aten"), ("custom", "custom")])
def test_variable_selects_the_implementation(value, expected):
    lines = probe(value)
    assert lines[0] == expected
    assert lines[1:] == (["op ran"] if torch.cuda.is_available() else [])


def test_invalid_variable_is_a_clear_error_at_every_call():
    message = "LORM_EXT_CUDA_KERNELS must be 'aten' or 'custom', got 'Custom'"
    lines = probe("Custom")
    assert lines[0] == f"ValueError: {message}"
    if torch.cuda.is_available():
        assert message in lines[1], lines


def test_use_cuda_kernels_switches_and_restores():
    before = ops.cuda_kernels()
    with ops.use_cuda_kernels("custom"):
        assert ops.cuda_kernels() == "custom"
        with ops.use_cuda_kernels("aten"):
            assert ops.cuda_kernels() == "aten"
        assert ops.cuda_kernels() == "custom"
    assert ops.cuda_kernels() == before


def test_use_cuda_kernels_refuses_an_unknown_name_and_keeps_the_choice():
    before = ops.cuda_kernels()
    with pytest.raises(ValueError, match="the CUDA kernel choice must be 'aten' or 'custom', got 'triton'"):
        with ops.use_cuda_kernels("triton"):
            pass
    assert ops.cuda_kernels() == before
