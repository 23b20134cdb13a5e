"""LoRM on Flower: the FCIL protocol in Flower's simulation engine reproduces the in-process driver bit for bit,
every client message survives the trip through Flower's records, malformed replies are dropped while the round
merges the others, a round without a usable reply fails, and no Ray process outlives a simulation."""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # read when flwr is imported: test runs report nothing

import json
import logging
import re
import subprocess
import time

import lorm_testing
import numpy as np
import pytest
import torch
from lorm_testing import changed_reply, ray_tmpdir, with_nan
from safetensors.torch import load_file

pytest.importorskip("flwr", reason="the Flower tests need `pip install 'flwr[simulation]==1.41.*'` (docs/flower.md)")
from flwr.app import Array, ArrayRecord, Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from lorm_ext.fcil import RunConfig, run
from lorm_ext.fcil.client import client_step
from lorm_ext.fcil.model import build_model
from lorm_ext.fcil.protocol import message_shapes
from lorm_ext.fcil.strategies import LoRM
from lorm_ext.flower import LoRMStrategy, NoUsableReplyError, simulate
from lorm_ext.flower.client_app import app as client_app
from lorm_ext.flower.client_app import run_state
from lorm_ext.flower.messages import (
    check_message,
    instruction_content,
    instruction_records,
    read_instruction,
    read_reply,
    reply_content,
)

RAY_EXIT_SECONDS = 30
NODES = [30, 10, 20]  # node ids of the in-process grid, not in client order: client k has the k-th smallest


def quick_config(**overrides) -> RunConfig:
    """3 clients × 2 tasks × 1 round of 1 epoch on the embedded MNIST, random backbone."""
    return lorm_testing.tiny_config(**({"num_epochs": 1, "batch_size": 64} | overrides))


@pytest.fixture(autouse=True)
def restore_threads():
    """Client and server set torch's thread count from the run configuration."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _ray_processes() -> set[int]:
    """Ray's processes on this machine: its binaries and scripts, and its workers ("ray::<name>")."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    lines = (line.strip().split(None, 1) for line in out.splitlines())
    return {int(pid) for pid, *args in lines if args and ("ray::" in args[0] or "/site-packages/ray/" in args[0])}


@pytest.fixture
def ray_dir(monkeypatch):
    """A private RAY_TMPDIR (lorm_testing.ray_tmpdir); after the test, every Ray process started during it must
    be gone within RAY_EXIT_SECONDS."""
    before = _ray_processes()
    with ray_tmpdir(monkeypatch) as path:
        yield path
        deadline = time.monotonic() + RAY_EXIT_SECONDS
        while (left := _ray_processes() - before) and time.monotonic() < deadline:
            time.sleep(0.2)
    assert not left, f"Ray processes still running {RAY_EXIT_SECONDS} s after the simulation: {sorted(left)}"


def test_simulation_reproduces_the_in_process_driver(tmp_path, ray_dir):
    config = quick_config()
    torch.set_num_threads(config.num_threads)  # as the CLI does; the driver's floats depend on it
    run(config, run_state(config)[0], str(tmp_path))
    expected = load_file(str(tmp_path / "adapters.safetensors"))
    with open(tmp_path / "rounds.jsonl") as log:
        driver_accuracy = [json.loads(line)["accuracy"] for line in log]

    result = simulate(config, timeout=120)

    got = result.arrays.to_torch_state_dict()
    assert set(got) == set(expected)
    assert [k for k in expected if not torch.equal(got[k], expected[k])] == []
    units = sorted(result.evaluate_metrics_serverapp)
    assert units == [1, 2, 3, 4]  # per task: one round, one task end
    assert [result.evaluate_metrics_serverapp[u]["accuracy"] for u in units] == driver_accuracy
    assert all(result.train_metrics_clientapp[u]["clients"] == 3 for u in units)
    gcs_log = (ray_dir / "ray" / "session_latest" / "logs" / "gcs_server.out").read_text()
    assert re.findall(r"Registering new node\..* node_address=(\S+)", gcs_log) == ["127.0.0.1"]  # loopback only


def test_every_client_message_travels_exactly_and_passes_the_reply_check():
    for config, phases in [
        (quick_config(r=2), ["B", "A", "task end"]),
        (quick_config(r=2, prereduce=True), ["B"]),
        (quick_config(r=2, alpha_regmean_backbone=0.5), ["A"]),  # full backbone Grams
    ]:
        data, _ = run_state(quick_config())  # the data of every configuration here (one load of MNIST)
        model = build_model(config, data.dataset.num_classes, None)
        server = LoRM(config, model.layer_shapes, model.head_parameters())
        server.start_task(0)
        head_shape = tuple(model.head.weight.shape)
        indices = data.splits[0].train[1][:40]
        for phase in phases:
            instruction = (
                server.open_task_end((0, 5)) if phase == "task end" else server.open_round("BA".index(phase), (0, 5))
            )
            sent, config_sent, client = read_instruction(
                instruction_content(*instruction_records(instruction, config), 1)
            )
            assert (config_sent, client) == (config, 1)
            assert sent.tensors.keys() == instruction.tensors.keys()
            assert all(torch.equal(sent.tensors[k], v) for k, v in instruction.tensors.items())
            assert {**vars(sent), "tensors": None} == {**vars(instruction), "tensors": None}

            reply = client_step(model, data.dataset.train, indices, sent, config, client)
            message = read_reply(reply_content(reply))
            assert message.keys() == reply.message.keys()
            assert all(torch.equal(message[k], v) for k, v in reply.message.items())
            check_message(message, message_shapes(sent, config, model.layer_shapes, head_shape))


class InProcessGrid:
    """What LoRMStrategy uses of a Flower Grid, served by the ClientApp in this process. Node ids are not in
    client order and replies come back in reverse; ``tamper(server_round, client, instruction, reply)`` returns
    the reply to deliver, or None for none."""

    def __init__(self, tamper):
        self.nodes = NODES
        self.tamper = tamper
        self.server_round = 0
        # who sends: what Flower's runtime sets for a ServerApp before its messages can be made
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def send_and_receive(self, messages, *, timeout):
        self.server_round += 1
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            context = Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
            reply = self.tamper(
                self.server_round, sorted(self.nodes).index(node), message, client_app(message, context)
            )
            replies += [reply] if reply is not None else []
        return replies[::-1]


def _start_first_task(config: RunConfig, tamper):
    """The strategy over the first task only (as fast as a test can be), on an in-process grid."""
    data, _ = run_state(config)
    dataset = data.dataset
    model = build_model(config, dataset.num_classes, data.weights)  # the server's initial head
    strategy = LoRMStrategy(config, model.layer_shapes, [(0, dataset.classes_per_task)])
    head = ArrayRecord({f"head/{k}": v.detach().clone() for k, v in model.head_parameters().items()})
    return strategy.start(InProcessGrid(tamper), head, timeout=5)


def _tampering(changes: dict):
    """A tamper for InProcessGrid: the reply of each (server round, client) in ``changes`` goes through the change
    its entry starts with; the other replies pass as they are."""

    def tamper(server_round, client, message, reply):
        change = changes.get((server_round, client))
        return reply if change is None else change[0](reply)

    return tamper


MALFORMED = {  # (server round, client): the change, and the problem the log names
    (1, 0): (lambda r: changed_reply(r, "grams", "gram/blocks.1.mlp.fc1", None), "missing ['gram/blocks.1.mlp.fc1']"),
    (1, 2): (
        lambda r: changed_reply(r, "arrays", "B/blocks.0.attn.qkv", lambda t: t.T.contiguous()),
        "layer 'blocks.0.attn.qkv': B has shape (4, 192), expected (192, 4)",
    ),
    (2, 1): (
        lambda r: changed_reply(r, "grams", "gram/blocks.2.mlp.fc2", lambda t: with_nan(t, 3)),
        "layer 'blocks.2.mlp.fc2': gram contains NaN or Inf (1 entries)",
    ),
}


def test_malformed_replies_are_dropped_and_the_rounds_merge_the_others(caplog, monkeypatch):
    config = quick_config()
    received = []  # sample counts of the messages the server merges, in order
    merge = LoRM.receive

    def receive(self, message):
        received.append(int(message["num_samples"]))
        merge(self, message)

    monkeypatch.setattr(LoRM, "receive", receive)

    def absent(server_round, client, message, reply):
        return None if (server_round, client) in MALFORMED else reply

    with caplog.at_level(logging.WARNING, logger="flwr"):
        dropped = _start_first_task(config, _tampering(MALFORMED))
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "dropped" in r.getMessage()]
    nodes = sorted(NODES)
    where = {1: "task 0 round 0", 2: "task 0 end (Grams)"}
    assert lines == [
        f"{where[r]}: dropped the reply of client {c} (node {nodes[c]}): {problem}"
        for (r, c), (_, problem) in MALFORMED.items()
    ]
    assert [(m["clients"], m["dropped"]) for m in dropped.train_metrics_clientapp.values()] == [(1, 2), (2, 1)]
    shards = [len(shard) for shard in run_state(config)[0].splits[0].train]
    assert received == [shards[1], shards[0], shards[2]]  # the rest, in increasing client id

    # a dropped reply leaves no trace: the same run as if those replies had never arrived
    reference = _start_first_task(config, absent).arrays.to_torch_state_dict()
    got = dropped.arrays.to_torch_state_dict()
    assert got.keys() == reference.keys()
    assert [k for k in reference if not torch.equal(got[k], reference[k])] == []


def test_a_round_without_usable_replies_fails_naming_every_problem(caplog):
    problems = {
        0: (lambda m, r: changed_reply(r, "grams", "gram/head", None), "missing ['gram/head']"),
        1: (
            lambda m, r: Message(Error(code=1, reason="out of memory"), reply_to=m),
            "the client failed: out of memory",
        ),
        2: (
            lambda m, r: changed_reply(r, "grams", "gram/blocks.3.attn.proj", lambda t: t[:-1]),
            "layer 'blocks.3.attn.proj': gram is for 63 features, expected 64",
        ),
    }

    def malformed(server_round, client, message, reply):
        return problems[client][0](message, reply)

    details = "; ".join(f"client {c}: {p}" for c, (_, p) in problems.items())
    with pytest.raises(NoUsableReplyError) as failure, caplog.at_level(logging.WARNING, logger="flwr"):
        _start_first_task(quick_config(), malformed)
    assert str(failure.value) == f"task 0 round 0: no usable reply from the 3 clients ({details})"
    assert sum("dropped the reply" in r.getMessage() for r in caplog.records) == 3


def _raw(reply: Message, record: str, key: str, **fields) -> Message:
    """The reply with some of one array's fields (dtype, shape, stype, data) replaced as they travel: unchecked."""
    array = reply.content[record][key]
    fields = {f: fields.get(f, getattr(array, f)) for f in ("dtype", "shape", "stype", "data")}
    reply.content[record][key] = Array(**fields)
    return reply


def _numpy(reply: Message, record: str, key: str, change) -> Message:
    """The reply with one array replaced by ``change(the array as NumPy)``, which torch may not convert."""
    reply.content[record][key] = Array(change(reply.content[record][key].numpy()))
    return reply


def _metric(reply: Message, key: str, value) -> Message:
    reply.content["metrics"][key] = value
    return reply


def _without(reply: Message, record: str) -> Message:
    del reply.content[record]
    return reply


QKV, FC2 = "blocks.0.attn.qkv", "blocks.2.mlp.fc2"
# kind: (round it happens in: 1 training, 2 task end; the change; the start of the problem the log names)
MALFORMED_KINDS = {
    "non-numeric dtype": (
        1,
        lambda r: _numpy(r, "grams", f"gram/{QKV}", lambda g: np.full(g.shape, "x")),
        f"'gram/{QKV}' of the 'grams' record cannot be read as a tensor (TypeError: can't convert np.ndarray of "
        "type numpy.str_",
    ),
    "truncated bytes": (
        1,
        lambda r: _raw(r, "arrays", f"B/{FC2}", data=r.content["arrays"][f"B/{FC2}"].data[:-7]),
        f"'B/{FC2}' of the 'arrays' record cannot be read as a tensor (ValueError: EOF: reading array data",
    ),
    "no 'arrays' record": (1, lambda r: _without(r, "arrays"), "missing ['B/blocks.0.attn.proj'"),
    "seconds not a number": (
        1,
        lambda r: _metric(r, "train-seconds", [1.0, 2.0]),
        "train-seconds must be a finite non-negative number, got [1.0, 2.0]",
    ),
    "sample count out of range": (
        1,
        lambda r: _metric(r, "num-examples", 2**70),
        "num-examples 1180591620717411303424 cannot be read as a tensor (ValueError: Overflow",
    ),
    "other serialisation": (
        1,
        lambda r: _raw(r, "grams", "gram/head", stype="torch.save"),
        "'gram/head' of the 'grams' record cannot be read as a tensor (TypeError: Unsupported serialization type",
    ),
    "empty bytes": (
        2,
        lambda r: _raw(r, "grams", f"gram/{QKV}", data=b""),
        f"'gram/{QKV}' of the 'grams' record cannot be read as a tensor (EOFError: No data left in file)",
    ),
    "random bytes": (
        2,
        lambda r: _raw(r, "grams", f"gram/{FC2}", data=np.random.default_rng(0).bytes(300)),
        f"'gram/{FC2}' of the 'grams' record cannot be read as a tensor (",
    ),
    "integer Gram": (
        2,
        lambda r: changed_reply(r, "grams", f"gram/{QKV}", lambda t: t.to(torch.int64)),
        f"layer '{QKV}': gram must be floating point, got torch.int64",
    ),
    "byte order": (
        2,
        lambda r: _numpy(r, "grams", f"gram/{FC2}", lambda g: g.astype(">f4")),
        f"'gram/{FC2}' of the 'grams' record cannot be read as a tensor (ValueError: given numpy array has byte order",
    ),
    "key in both records": (
        2,
        lambda r: _with_record(r, "arrays", {f"gram/{QKV}": r.content["grams"][f"gram/{QKV}"]}),
        f"'gram/{QKV}' is in both the 'arrays' and the 'grams' record",
    ),
    "seconds not finite": (
        2,
        lambda r: _metric(r, "gram-seconds", float("nan")),
        "gram-seconds must be a finite non-negative number, got nan",
    ),
}


def _with_record(reply: Message, record: str, arrays: dict) -> Message:
    reply.content[record] = ArrayRecord(arrays)
    return reply


@pytest.mark.parametrize("kinds", [list(MALFORMED_KINDS)[i::3] for i in range(3)], ids=lambda k: ", ".join(k))
def test_every_kind_of_malformed_reply_is_dropped_with_a_log_line(caplog, kinds):
    """Each server round gets two bad replies of the kinds of that round (clients 0 and 2); the run goes on."""
    slots = {}
    for kind in kinds:
        server_round, change, problem = MALFORMED_KINDS[kind]
        client = 2 * sum(r == server_round for r, _ in slots)
        slots[(server_round, client)] = (change, problem)

    with caplog.at_level(logging.WARNING, logger="flwr"):
        result = _start_first_task(quick_config(), _tampering(slots))
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    nodes = sorted(NODES)
    where = {1: "task 0 round 0", 2: "task 0 end (Grams)"}
    assert len(lines) == len(slots)
    for line, ((server_round, client), (_, problem)) in zip(lines, sorted(slots.items(), key=lambda s: s[0])):
        dropped = f"{where[server_round]}: dropped the reply of client {client} (node {nodes[client]}): "
        assert line.startswith(dropped + problem)
        assert "\n" not in line
    merged = [(m["clients"], m["dropped"]) for m in result.train_metrics_clientapp.values()]
    assert merged == [(3 - sum(r == u for r, _ in slots), sum(r == u for r, _ in slots)) for u in (1, 2)]


def test_a_reply_from_a_node_that_was_not_asked_is_ignored(caplog):
    def impostor(server_round, client, message, reply):
        if (server_round, client) == (1, 1):
            reply.metadata.__dict__["_src_node_id"] = 99  # Metadata has no setter: what a forged reply carries
        return reply

    with caplog.at_level(logging.WARNING, logger="flwr"):
        result = _start_first_task(quick_config(), impostor)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert lines == [
        "task 0 round 0: ignored a reply from node 99, which was not asked",
        f"task 0 round 0: dropped the reply of client 1 (node {sorted(NODES)[1]}): no reply before the timeout",
    ]
    assert [(m["clients"], m["dropped"]) for m in result.train_metrics_clientapp.values()] == [(2, 1), (3, 0)]


def test_the_strategy_refuses_other_strategies_and_a_wrong_number_of_nodes():
    from lorm_ext.fcil.config import ConfigError

    with pytest.raises(ConfigError, match="LoRMStrategy runs strategy 'lorm', got a configuration of 'fedit'"):
        LoRMStrategy(quick_config(strategy="fedit"), {}, [(0, 5)])
    with pytest.raises(ConfigError, match="num_clients 4 .* but 3 nodes are connected after waiting up to 0.2 s"):
        strategy = LoRMStrategy(quick_config(num_clients=4), {"layer": (8, 8)}, [(0, 5)])
        head = ArrayRecord({"head/weight": torch.zeros(5, 8), "head/bias": torch.zeros(5)})
        strategy.start(InProcessGrid(None), head, timeout=0.2)


def test_check_message_names_the_layer_and_the_problem_of_each_bad_value():
    from lorm_ext.flower.messages import check_message

    expected = {"B/l": (3, 2), "P/l": (2, 2), "head/weight": (4, 5)}
    good = {
        "num_samples": torch.tensor(7),
        "B/l": torch.randn(3, 2),
        "P/l": torch.eye(2),
        "head/weight": torch.randn(4, 5),
    }
    check_message(good, expected)
    bad = {
        "layer 'l': B contains NaN or Inf (1 entries)": {"B/l": with_nan(good["B/l"], 3)},
        "layer 'head': head/weight contains NaN or Inf (1 entries)": {"head/weight": with_nan(good["head/weight"], 3)},
        "layer 'l': gram is not symmetric": {"P/l": torch.tensor([[1.0, 0.5], [0.0, 1.0]])},
        "layer 'l': gram has a negative diagonal entry": {"P/l": -torch.eye(2)},
        "layer 'l': B has shape (2, 3), expected (3, 2)": {"B/l": torch.randn(2, 3)},
        "num-examples must be a positive integer": {"num_samples": torch.tensor(0)},
    }
    for problem, change in bad.items():
        with pytest.raises(ValueError, match=re.escape(problem)):
            check_message(good | change, expected)
