"""LoRAMergeStrategy, the Flower strategy for any LoRA model: the quickstart app (docs/flower.md) in Flower's
simulation engine and on an in-process grid, its merges against the reference, the reply records, malformed
replies dropped while the round merges the others, and bad arguments."""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # read when flwr is imported: test runs report nothing

import logging

import pytest
import torch
from lorm_testing import changed_reply, ray_tmpdir, with_nan

pytest.importorskip("flwr", reason="the Flower tests need `pip install 'flwr[simulation]==1.41.*'` (docs/flower.md)")
pytest.importorskip("peft", reason="the quickstart app adapts its model with PEFT")
from flwr.app import ArrayRecord, Context, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from lorm_ext import reference
from lorm_ext.flower import LoRAMergeStrategy, NoUsableReplyError, lora_reply, quickstart, read_adapter
from lorm_ext.flower.messages import read_reply
from lorm_ext.flower.strategy import balanced

NODES = [30, 10, 20]  # node ids, not in partition order: partition p runs on the p-th node listed


class InProcessGrid:
    """What a strategy uses of a Flower Grid, served by the quickstart ClientApp in this process (replies in
    reverse order); ``tamper(server_round, node, reply)`` returns the reply to deliver, or None for none.
    ``replies`` keeps every delivered reply's content, per round."""

    def __init__(self, tamper=None):
        self.tamper = tamper or (lambda server_round, node, reply: reply)
        self.server_round, self.replies = 0, []
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1

    def get_node_ids(self) -> list[int]:
        return NODES

    def send_and_receive(self, messages, *, timeout):
        self.server_round += 1
        delivered = {}
        for message in messages:
            node = message.metadata.dst_node_id
            node_config = {"partition-id": NODES.index(node), "num-partitions": len(NODES)}
            context = Context(run_id=1, node_id=node, node_config=node_config, state=RecordDict(), run_config={})
            reply = self.tamper(self.server_round, node, quickstart.client_app(message, context))
            if reply is not None:
                delivered[node] = reply
        self.replies.append({node: read_reply(r.content) for node, r in delivered.items() if not r.has_error()})
        return list(delivered.values())[::-1]


def _run(grid, rounds=2, **options):
    strategy = LoRAMergeStrategy(quickstart.MODULES, quickstart.RANK, min_nodes=len(NODES), **options)
    return strategy.start(grid, ArrayRecord(), num_rounds=rounds, timeout=5)


def _delta(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return b.double() @ a.double()


@pytest.mark.parametrize("method", ["exact", "alternating"])
def test_each_round_is_the_rank_r_optimum_of_the_replies(method):
    grid = InProcessGrid()
    result = _run(grid, method=method)
    merged = result.arrays.to_torch_state_dict()
    last = [grid.replies[-1][node] for node in sorted(NODES)]  # merged in increasing node id
    for name in quickstart.MODULES:
        args = [[m[f"{f}/{name}"] for m in last] for f in ("B", "A", "gram")]
        b, a = reference.rank_r_optimum_ref(*args, quickstart.RANK)
        expected, got = b @ a, _delta(merged[f"B/{name}"], merged[f"A/{name}"])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
        # the optimum beats every reply's own update on the objective it minimises
        deltas = [_delta(b_k, a_k) for b_k, a_k in zip(args[0], args[1])]
        optimum = reference.objective_ref(got, deltas, args[2])
        assert all(optimum <= reference.objective_ref(d, deltas, args[2]) for d in deltas)
    assert result.train_metrics_clientapp[2]["nodes"] == 3 and result.train_metrics_clientapp[2]["dropped"] == 0


@pytest.mark.parametrize("method", ["exact", "alternating"])
def test_the_quickstart_keeps_learning_from_round_to_round(method):
    """Nodes train on from the merged adapter: each round at least as good as the first merge, all far better
    than the base model (the exact solve's A G Aᵀ = I scale, left unbalanced, fell back to near the base)."""
    strategy = LoRAMergeStrategy(quickstart.MODULES, quickstart.RANK, min_nodes=len(NODES), method=method)
    evaluate = lambda server_round, arrays: MetricRecord({"accuracy": quickstart.accuracy(arrays)})  # noqa: E731
    result = strategy.start(InProcessGrid(), ArrayRecord(), num_rounds=3, timeout=5, evaluate_fn=evaluate)
    accuracies = [m["accuracy"] for m in result.evaluate_metrics_serverapp.values()]
    assert min(accuracies) > quickstart.accuracy(ArrayRecord()) + 0.3
    assert accuracies[-1] >= accuracies[0], accuracies


def test_balanced_factors_have_the_same_product_and_equal_component_norms():
    b, a = torch.randn(6, 3, dtype=torch.float64) * 100, torch.randn(3, 5, dtype=torch.float64) / 100
    b[:, 2] = 0  # a zero component stays as it is
    balanced_b, balanced_a = balanced(b, a)
    torch.testing.assert_close(balanced_b @ balanced_a, b @ a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(balanced_b.norm(dim=0)[:2], balanced_a.norm(dim=1)[:2], rtol=1e-12, atol=0)
    assert torch.equal(balanced_a[2], a[2])


def test_nodes_load_what_the_server_merged():
    """The merged adapter goes into the node's LoRA layers as sent: s·B on the wire, B in the model."""
    model = quickstart.lora_model()
    merged = _run(InProcessGrid(), rounds=1).arrays
    quickstart.load_adapter(model, merged)
    layer = quickstart.lora_layers(model)["fc1"]
    sent = merged.to_torch_state_dict()
    assert torch.equal(layer.lora_A["default"].weight.detach(), sent["A/fc1"])
    torch.testing.assert_close(layer.scaling["default"] * layer.lora_B["default"].weight.detach(), sent["B/fc1"])


def test_lora_reply_and_read_adapter_fold_the_scaling_into_b():
    b, a, gram = torch.randn(5, 2), torch.randn(2, 3), torch.eye(3)
    content = lora_reply({"m": (b, a)}, {"m": gram}, 7, scaling={"m": 4.0})
    message = read_reply(content)
    assert torch.equal(message["B/m"], 4.0 * b) and torch.equal(message["A/m"], a)
    assert torch.equal(message["gram/m"], gram) and int(message["num_samples"]) == 7
    loaded = read_adapter(content["arrays"], ["m"], scaling=4.0)
    assert torch.equal(loaded["m"][1], a) and torch.allclose(loaded["m"][0], b)
    assert read_adapter(ArrayRecord(), ["m"]) == {}
    with pytest.raises(ValueError, match=r"lora_reply: factors are for \['m'\] but grams for \['n'\]"):
        lora_reply({"m": (b, a)}, {"n": gram}, 7)


BAD = {  # (round, node): the change, and the problem the log names
    (1, 10): (lambda r: changed_reply(r, "grams", "gram/fc2", None), "missing ['gram/fc2']"),
    (1, 30): (
        lambda r: changed_reply(r, "arrays", "A/fc1", lambda t: t[:-1]),
        "layer 'fc1': B has rank 4 but A has rank 3",
    ),
    (2, 20): (
        lambda r: changed_reply(r, "grams", "gram/fc1", lambda t: with_nan(t, 0)),
        "layer 'fc1': gram contains NaN or Inf (1 entries)",
    ),
}


def test_malformed_replies_are_dropped_with_a_log_line_and_the_rounds_merge_the_others(caplog):
    def tamper(server_round, node, reply):
        change = BAD.get((server_round, node))
        return reply if change is None else change[0](reply)

    with caplog.at_level(logging.WARNING, logger="flwr"):
        dropped = _run(InProcessGrid(tamper))
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert lines == [f"round {r}: dropped the reply of node {n}: {problem}" for (r, n), (_, problem) in BAD.items()]
    assert [(m["nodes"], m["dropped"]) for m in dropped.train_metrics_clientapp.values()] == [(1, 2), (2, 1)]

    # a dropped reply leaves no trace: the same merges as if it had never arrived
    absent = _run(InProcessGrid(lambda server_round, node, reply: None if (server_round, node) in BAD else reply))
    got, expected = dropped.arrays.to_torch_state_dict(), absent.arrays.to_torch_state_dict()
    assert [k for k in expected if not torch.equal(got[k], expected[k])] == []


def test_a_round_without_usable_replies_fails_and_a_stranger_is_ignored(caplog):
    def stranger(server_round, node, reply):
        if node == 20:
            reply.metadata.__dict__["_src_node_id"] = 99  # Metadata has no setter: what a forged reply carries
        return reply

    with caplog.at_level(logging.WARNING, logger="flwr"):
        result = _run(InProcessGrid(stranger), rounds=1)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert lines == [
        "round 1: ignored a reply from node 99, which was not asked",
        "round 1: dropped the reply of node 20: no reply before the timeout",
    ]
    assert result.train_metrics_clientapp[1]["nodes"] == 2
    with pytest.raises(NoUsableReplyError, match=r"round 1: no usable reply from the 3 nodes \(node 10: missing"):
        _run(InProcessGrid(lambda server_round, node, reply: changed_reply(reply, "grams", "gram/fc1", None)), rounds=1)


@pytest.mark.parametrize(
    "args, options, problem",
    [
        (({}, 2), {}, "module_shapes must name at least one module, as {module: (out, in)}"),
        (({"m": (4, 0)}, 2), {}, "module 'm' has shape (4, 0), expected (out, in) > 0"),
        (({"m": (4, 3)}, 0), {}, "rank must be a positive integer, got 0"),
        (({"m": (4, 3)}, 4), {}, "rank 4 exceeds module 'm' (4 × 3)"),
        (({"m": (4, 3)}, 2), {"method": "svd"}, "method must be one of ('alternating', 'exact'), got 'svd'"),
        (({"m": (4, 3)}, 2), {"min_nodes": 0}, "min_nodes must be a positive integer, got 0"),
    ],
)
def test_bad_arguments_are_one_line_naming_them(args, options, problem):
    with pytest.raises(ValueError) as error:
        LoRAMergeStrategy(*args, **options)
    assert str(error.value) == f"LoRAMergeStrategy: {problem}"


def test_a_bad_initial_adapter_and_too_few_nodes_are_refused():
    strategy = LoRAMergeStrategy({"fc1": (32, 16)}, 4, min_nodes=4)
    with pytest.raises(ValueError, match=r"initial adapter must be empty or hold exactly \['A/fc1', 'B/fc1'\]"):
        strategy.start(InProcessGrid(), ArrayRecord({"A/fc1": torch.zeros(4, 16)}), num_rounds=1, timeout=0.1)
    with pytest.raises(ConnectionError, match="min_nodes is 4 but 3 nodes are connected after waiting up to 0.1 s"):
        strategy.start(InProcessGrid(), ArrayRecord(), num_rounds=1, timeout=0.1)


def test_the_quickstart_in_flowers_simulation_engine_merges_as_message_by_message(monkeypatch):
    """The quickstart's ServerApp and ClientApp in Ray actors: the same merged adapters as on the in-process
    grid, up to the order in which the nodes' sums are added (Flower numbers the nodes at random)."""
    from lorm_ext.flower.server_app import run_simulation_here

    with ray_tmpdir(monkeypatch):
        run_simulation_here(quickstart.server_app, quickstart.client_app, quickstart.NUM_NODES)
    simulated = quickstart.results[-1]
    strategy = LoRAMergeStrategy(quickstart.MODULES, quickstart.RANK, min_nodes=quickstart.NUM_NODES)
    in_process = strategy.start(InProcessGrid(), ArrayRecord(), num_rounds=quickstart.NUM_ROUNDS, timeout=5)
    got, expected = simulated.arrays.to_torch_state_dict(), in_process.arrays.to_torch_state_dict()
    assert got.keys() == expected.keys()
    for name in quickstart.MODULES:
        product = _delta(expected[f"B/{name}"], expected[f"A/{name}"])
        torch.testing.assert_close(
            _delta(got[f"B/{name}"], got[f"A/{name}"]), product, rtol=1e-4, atol=1e-4 * float(product.abs().max())
        )
    assert [m["nodes"] for m in simulated.train_metrics_clientapp.values()] == [quickstart.NUM_NODES] * 3
