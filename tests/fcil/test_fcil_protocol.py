"""The FCIL protocol module: the layout of a reply for every kind of instruction, ΔW against PEFT's own
get_delta_weight, open_unit / close_unit, and the servers reading a reply as the instruction they sent says."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from lorm_ext.fcil import protocol
from lorm_ext.fcil.protocol import FIT, TASK_GRAMS, Instruction, Layout, delta_weight, layout, message_shapes
from lorm_ext.fcil.strategies import SERVERS, LoRM
from lorm_ext.merge import RegMeanMerger

SHAPES = {"blocks.0.attn.qkv": (9, 5), "blocks.0.mlp.fc2": (5, 7)}
RANK, HEAD_SHAPE = 2, (3, 5)


def _instruction(phase=FIT, train="", grams=False, prereduce=False) -> Instruction:
    return Instruction(phase, 0, 0, 0, 3, train=train, grams=grams, prereduce=prereduce)


@pytest.mark.parametrize(
    "instruction, expected",
    [
        (_instruction(train="AB"), Layout("AB", True, False, False, False)),  # fedit, lora-fair
        (_instruction(train="B"), Layout("B", True, False, False, False)),  # ffa-lora
        (_instruction(train="A", grams=True, prereduce=True), Layout("A", True, True, True, False)),  # no effect
        (_instruction(train="B", grams=True), Layout("B", True, True, True, False)),
        (_instruction(train="B", grams=True, prereduce=True), Layout("", True, True, False, True)),
        (_instruction(TASK_GRAMS, grams=True), Layout("", False, False, True, False)),
    ],
)
def test_layout_of_each_instruction_and_the_shapes_that_follow_it(tiny_config, instruction, expected):
    assert layout(instruction) == expected
    for alpha, gram_shape in ((0.0, lambda n: (n,)), (0.5, lambda n: (n, n))):
        config = tiny_config(r=RANK, alpha_regmean_backbone=alpha)
        shapes = message_shapes(instruction, config, SHAPES, HEAD_SHAPE)
        wanted = {}
        for name, (out_features, in_features) in SHAPES.items():
            for factor in expected.factors:
                wanted[f"{factor}/{name}"] = (RANK, in_features) if factor == "A" else (out_features, RANK)
            if expected.layer_grams:
                wanted[f"gram/{name}"] = gram_shape(in_features)
            if expected.projections:
                wanted |= {f"BP/{name}": (out_features, RANK), f"P/{name}": (RANK, RANK)}
        if expected.head:
            wanted |= {"head/weight": HEAD_SHAPE, "head/bias": HEAD_SHAPE[:1]}
        if expected.head_gram:
            wanted["gram/head"] = (HEAD_SHAPE[1],) * 2
        assert shapes == wanted


@pytest.mark.parametrize("lora_alpha", [None, 8.0])
def test_delta_weight_is_pefts_get_delta_weight(tiny_config, lora_alpha):
    from peft import LoraConfig, get_peft_model

    config = tiny_config(r=RANK, lora_alpha=lora_alpha)
    # no lora_alpha: no scaling, as the authors; PEFT's scaling is lora_alpha / r, so 1 at lora_alpha = r
    peft_config = LoraConfig(r=RANK, lora_alpha=lora_alpha or RANK, target_modules=["fc"], init_lora_weights=False)
    model = get_peft_model(torch.nn.Sequential(OrderedDict(fc=torch.nn.Linear(7, 5))), peft_config)
    layer = model.get_base_model().fc
    b, a = layer.lora_B["default"].weight.detach(), layer.lora_A["default"].weight.detach()
    torch.testing.assert_close(delta_weight(config, b, a), layer.get_delta_weight("default"), rtol=1e-6, atol=1e-6)


class _Recorder:
    """What open_unit / close_unit call on a server, in order."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, *args)) or name


def test_open_unit_starts_the_task_at_its_first_round_and_close_unit_ends_it():
    server = _Recorder()
    for task, round_ in protocol.units(type("C", (), {"num_comm_rounds": 2})(), 2):
        opened = protocol.open_unit(server, task, round_, (2 * task, 2))
        protocol.close_unit(server, round_)
        assert opened == ("open_task_end" if round_ is None else "open_round")
    assert server.calls == [
        ("start_task", 0), ("open_round", 0, (0, 2)), ("close",),
        ("open_round", 1, (0, 2)), ("close",),
        ("open_task_end", (0, 2)), ("close_task",),
        ("start_task", 1), ("open_round", 0, (2, 2)), ("close",),
        ("open_round", 1, (2, 2)), ("close",),
        ("open_task_end", (2, 2)), ("close_task",),
    ]  # fmt: skip


def _lorm(tiny_config, **overrides) -> LoRM:
    head = {"weight": torch.randn(*HEAD_SHAPE), "bias": torch.randn(HEAD_SHAPE[0])}
    server = SERVERS["lorm"](tiny_config(strategy="lorm", r=RANK, **overrides), SHAPES, head)
    server.start_task(0)
    return server


def _reply(keys: set[str], seed: int) -> dict[str, torch.Tensor]:
    """A reply holding made-up tensors under every key LoRM might read: Grams diagonal, factors of rank 2."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"num_samples": torch.tensor(4), "head/weight": torch.randn(*HEAD_SHAPE, generator=g)}
    tensors |= {"head/bias": torch.randn(HEAD_SHAPE[0], generator=g), "gram/head": torch.eye(HEAD_SHAPE[1])}
    for name, (out_features, in_features) in SHAPES.items():
        tensors |= {f"A/{name}": torch.randn(RANK, in_features, generator=g)}
        tensors |= {f"B/{name}": torch.randn(out_features, RANK, generator=g)}
        tensors |= {f"gram/{name}": torch.rand(in_features, generator=g) + 0.5}
        tensors |= {f"BP/{name}": torch.randn(out_features, RANK, generator=g), f"P/{name}": torch.eye(RANK)}
    return {k: v for k, v in tensors.items() if k in keys | {"num_samples"}}


def test_lorm_reads_a_reply_as_the_instruction_it_sent_laid_it_out(tiny_config):
    """A pre-reduced B-round is merged from BP/P even when B and the Grams travel too, a raw one from B and the
    Grams even when BP/P travel too: the same model as from exactly the keys the instruction laid out."""
    every_key = {f"{kind}/{n}" for kind in ("B", "gram", "BP", "P") for n in SHAPES}
    for prereduce in (False, True):
        server, reference = _lorm(tiny_config, prereduce=prereduce), _lorm(tiny_config, prereduce=prereduce)
        keys = set(message_shapes(server.open_round(0, (0, 3)), server.config, SHAPES, HEAD_SHAPE))
        reference.open_round(0, (0, 3))
        for seed in range(2):
            server.receive(_reply(keys | every_key, seed))
            reference.receive(_reply(keys, seed))
        server.close()
        reference.close()
        assert all(torch.equal(server.current[k], reference.current[k]) for k in reference.current)
    raw = _lorm(tiny_config)
    keys = set(message_shapes(raw.open_round(0, (0, 3)), raw.config, SHAPES, HEAD_SHAPE))
    with pytest.raises(KeyError, match="B/blocks.0.attn.qkv"):  # what the instruction asked for is what is read
        raw.receive(_reply({k for k in keys if not k.startswith("B/")}, 0))


def test_the_cross_task_merge_is_solved_once_per_task_end(tiny_config, monkeypatch):
    server = _lorm(tiny_config)
    solves = []
    merge = RegMeanMerger.merge
    monkeypatch.setattr(RegMeanMerger, "merge", lambda self: solves.append(self) or merge(self))
    for task in range(3):
        server.start_task(task)
        server.open_task_end((0, 3))
        server.receive(_reply({f"gram/{n}" for n in SHAPES}, task))
        server.close_task()
        first = server.evaluation_deltas()
        again = server.model_tensors()
        assert all(torch.equal(first[n], again[f"delta/{n}"]) for n in SHAPES)
        assert len(solves) == (task > 0) * task  # none for the first task, then one per task end
    # the cached solve is the solve of the current sums, and a restored server gets the same one
    restored = _lorm(tiny_config)
    restored.load_state_dict(server.state_dict())
    fresh = {n: d.to(torch.float32) for n, d in merge(server._across_tasks).items()}
    for deltas in (server.evaluation_deltas(), restored.evaluation_deltas()):
        assert all(torch.equal(deltas[n], fresh[n]) for n in SHAPES)
