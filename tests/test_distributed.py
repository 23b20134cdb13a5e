"""Gram collection and merges shared by 2 CPU processes (gloo, 127.0.0.1) equal the single-process results.

The clients are split unevenly, including a process with no clients or no data at all; each worker saves
what it ends up with and the test compares it with the same work done in this process.
"""

from __future__ import annotations

import datetime
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lorm_ext import AdapterMerger, BStepMerger, GramCollector, RegMeanMerger
from lorm_ext.distributed import all_reduce_grams_, all_reduce_merger_

WORLD_SIZE = 2
TIMEOUT_S = 120
LAYERS = {"q": (6, 5), "v": (4, 5), "out": (7, 9)}  # name: (out, in)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 3))


def make_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(3, 4, 5, generator=g) for _ in range(5)]


def make_clients(n: int) -> list[dict]:
    """Random LoRA clients: B_k (out × 2), A_k (2 × in), full Grams except a diagonal one for 'v'."""
    g = torch.Generator().manual_seed(2)
    clients = []
    for _ in range(n):
        client = {"b": {}, "a": {}, "gram": {}}
        for name, (out, width) in LAYERS.items():
            x = torch.randn(11, width, dtype=torch.float64, generator=g)
            client["b"][name] = torch.randn(out, 2, dtype=torch.float64, generator=g)
            client["a"][name] = torch.randn(2, width, dtype=torch.float64, generator=g)
            client["gram"][name] = (x * x).sum(0) if name == "v" else x.T @ x
        clients.append(client)
    return clients


def shared_a() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {name: torch.randn(2, width, dtype=torch.float64, generator=g) for name, (_, width) in LAYERS.items()}


def run_all(shares: dict[str, list[int]]) -> dict:
    """The work of one process: collect Grams over its batches and add its clients to every merger, all-reduce
    when in a process group, and return everything a merge reads."""
    distributed = dist.is_initialized()
    batches, clients = make_batches(), make_clients(5)
    results = {}
    for name, diagonal in (("grams", False), ("grams_diag", True)):
        model = make_model()
        collector = GramCollector(model, r"^[02]$", diagonal=diagonal, dtype=torch.float64)
        with torch.no_grad(), collector:
            for i in shares[name]:
                model(batches[i])
        if distributed:
            all_reduce_grams_(collector)
        results[name] = (dict(collector.grams), dict(collector.num_tokens))

    regmean = RegMeanMerger()
    adapter = AdapterMerger(rank=2)
    b_step = BStepMerger(shared_a())
    for i in shares["regmean"]:
        regmean.add_client(clients[i]["a"], clients[i]["gram"], lefts=clients[i]["b"])
    for i in shares["adapter"]:
        adapter.add_client(clients[i]["b"], clients[i]["a"], clients[i]["gram"])
    for i in shares["b_step"]:
        b_step.add_client(clients[i]["b"], clients[i]["gram"])
    if distributed:
        for merger in (regmean, adapter, b_step):
            all_reduce_merger_(merger)
    exact = adapter.merge("exact")
    results["regmean"] = (regmean.merge(), regmean.num_clients)
    results["adapter"] = (exact, adapter.merge("alternating"), adapter.objective(exact), adapter.num_clients)
    results["b_step"] = (b_step.merge(), b_step.num_clients)
    return results


# Process 1 gets no batch for the diagonal collector and no client for the AdapterMerger.
SHARES = [
    {
        "grams": [0, 1, 2],
        "grams_diag": [0, 1, 2, 3, 4],
        "regmean": [0, 1, 2],
        "adapter": [0, 1, 2, 3, 4],
        "b_step": [4],
    },
    {"grams": [3, 4], "grams_diag": [], "regmean": [3, 4], "adapter": [], "b_step": [0, 1, 2, 3]},
]
ALL = {key: sorted(SHARES[0][key] + SHARES[1][key]) for key in SHARES[0]}


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    try:
        torch.save(run_all(SHARES[rank]), Path(out_dir) / f"rank{rank}.pt")
        # Disagreeing processes: every one gets the same error instead of waiting on the other.
        width = 5 + rank
        mismatched = RegMeanMerger()
        mismatched.add_client({"q": torch.ones(3, width)}, {"q": torch.eye(width)})
        try:
            all_reduce_merger_(mismatched)
            error = "no error"
        except ValueError as err:
            error = str(err)
        (Path(out_dir) / f"rank{rank}.error").write_text(error)
        # Mergers of different kinds: every process names process 0's kind as process 0's.
        other_kind = RegMeanMerger() if rank == 0 else BStepMerger({"q": torch.ones(2, 5)})
        try:
            all_reduce_merger_(other_kind)
            error = "no error"
        except ValueError as err:
            error = str(err)
        (Path(out_dir) / f"rank{rank}.kind_error").write_text(error)
    except BaseException:
        (Path(out_dir) / f"rank{rank}.traceback").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("ranks")
    context = mp.start_processes(
        _worker, args=(free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD_SIZE} processes did not finish within {TIMEOUT_S} s")
    except (mp.ProcessRaisedException, mp.ProcessExitedException):
        tracebacks = [p.read_text() for p in sorted(out_dir.glob("*.traceback"))]
        pytest.fail("a worker failed:\n" + "\n".join(tracebacks))
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
    return [
        {
            "results": torch.load(out_dir / f"rank{r}.pt"),
            "error": (out_dir / f"rank{r}.error").read_text(),
            "kind_error": (out_dir / f"rank{r}.kind_error").read_text(),
        }
        for r in range(WORLD_SIZE)
    ]


@pytest.fixture(scope="module")
def single_process() -> dict:
    return run_all(ALL)


def assert_same(actual, expected) -> None:
    """Nested dicts / tuples of tensors and numbers equal up to the order of float64 additions."""
    if isinstance(expected, dict):
        assert sorted(actual) == sorted(expected)
        for key in expected:
            assert_same(actual[key], expected[key])
    elif isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_same(a, e)
    elif isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9 * max(1.0, expected.abs().max().item()))
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=1e-9)
    else:
        assert actual == expected


@pytest.mark.parametrize("part", ["grams", "grams_diag", "regmean", "adapter", "b_step"])
@pytest.mark.parametrize("rank", range(WORLD_SIZE))
def test_distributed_equals_single_process(distributed_results, single_process, rank, part):
    assert_same(distributed_results[rank]["results"][part], single_process[part])


def test_counts_are_summed(distributed_results):
    results = distributed_results[1]["results"]
    assert results["grams"][1] == {"0": 5 * 12, "2": 5 * 12}  # tokens: 5 batches of 3 × 4
    assert results["regmean"][1] == 5 and results["adapter"][3] == 5 and results["b_step"][1] == 5


def test_disagreeing_processes_all_get_the_error(distributed_results):
    errors = [r["error"] for r in distributed_results]
    assert errors[0] == errors[1]
    assert "sums.q.denominator is (6, 6) torch.float64 on process 1 but (5, 5) torch.float64 on process 0" in errors[0]


def test_processes_with_different_mergers_all_name_process_0s_merger(distributed_results):
    problem = "process 1 has ('BStepMerger', (('q', (2, 5)),)), process 0 has ('RegMeanMerger', ())"
    errors = [r["kind_error"] for r in distributed_results]
    assert errors == [f"all_reduce_merger_({kind}): {problem}" for kind in ("RegMeanMerger", "BStepMerger")]
