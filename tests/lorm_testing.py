"""Helpers the tests import (a plain module: conftest.py files of different folders share one module name)."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from lorm_ext.fcil.config import RunConfig

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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


def with_nan(t: torch.Tensor, index: int) -> torch.Tensor:
    """A copy of ``t`` with a NaN at flat position ``index``."""
    t = t.clone()
    t.view(-1)[index] = float("nan")
    return t


def seeded_model(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``build()`` in eval mode, torch seeded with 0 just before: the same weights at every call."""
    torch.manual_seed(0)
    return build().eval()


def right_padding_mask(lengths: list[int], device="cpu") -> torch.Tensor:
    """The 0/1 attention mask (int64, as a tokenizer's) of right-padded sequences of these lengths."""
    return (torch.arange(max(lengths), device=device) < torch.tensor(lengths, device=device)[:, None]).long()


class RunsCode:
    """Unpickling it calls ``call(*args)``: what a crafted archive or checkpoint would do."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def tiny_config(**overrides) -> RunConfig:
    """RunConfig(**overrides) of a tiny FCIL run: 2 tasks, 3 clients, 1 round of 2 epochs, random backbone."""
    fields = dict(pretrained=False, n_tasks=2, num_clients=3, num_comm_rounds=1, num_epochs=2, lr=1e-2, seed=0)
    return RunConfig(**(fields | overrides))


@contextlib.contextmanager
def ray_tmpdir(monkeypatch) -> Iterator[Path]:
    """A private RAY_TMPDIR under /tmp (short: Ray's socket paths must stay under 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="ray", dir="/tmp", ignore_cleanup_errors=True) as path:
        monkeypatch.setenv("RAY_TMPDIR", path)
        yield Path(path)


def changed_reply(reply, record: str, key: str, change):
    """The Flower reply with one tensor of its ``record`` changed (``change(tensor)``) or removed (``change``
    None)."""
    from flwr.app import ArrayRecord  # flwr is optional: only the Flower tests get here

    tensors = dict(reply.content[record].to_torch_state_dict())
    if change is None:
        del tensors[key]
    else:
        tensors[key] = change(tensors[key])
    reply.content[record] = ArrayRecord(tensors)
    return reply
