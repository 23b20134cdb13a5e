"""Each strategy's server step against lorm_ext.reference (or a literal dense reference) on made-up client
updates: messages built by hand, folded in one at a time, compared with the closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from lorm_testing import random_gram

from lorm_ext import reference
from lorm_ext.fcil.protocol import FIT, TASK_GRAMS
from lorm_ext.fcil.strategies import SERVERS, LoRM, lora_fair_correction
from lorm_ext.merge import project_client

SHAPES = {"blocks.0.attn.qkv": (9, 5), "blocks.0.mlp.fc2": (5, 7)}
RANK, CLASSES, WIDTH = 2, 3, 5
SAMPLES = [7, 11, 30]


def _gram(width: int, diagonal: bool, seed: int) -> torch.Tensor:
    return random_gram(width, 3 * width, dtype=torch.float32, diagonal=diagonal, seed=seed)


def _server(name: str, tiny_config, **overrides):
    config = tiny_config(strategy=name, r=RANK, **overrides)
    head = {"weight": torch.randn(CLASSES, WIDTH), "bias": torch.randn(CLASSES)}
    server = SERVERS[name](config, SHAPES, head)
    server.start_task(0)
    return server


def _messages(server, factors: str, diagonal: bool | None, seed: int = 0):
    """Random client updates of the given factors, head and (unless diagonal is None) Grams."""
    torch.manual_seed(seed)
    messages = []
    for k, n in enumerate(SAMPLES):
        m = {
            "num_samples": torch.tensor(n),
            "head/weight": torch.randn(CLASSES, WIDTH),
            "head/bias": torch.randn(CLASSES),
        }
        for name, (out_features, in_features) in SHAPES.items():
            if "A" in factors:
                m[f"A/{name}"] = torch.randn(RANK, in_features)
            if "B" in factors:
                m[f"B/{name}"] = torch.randn(out_features, RANK)
            if diagonal is not None:
                m[f"gram/{name}"] = _gram(in_features, diagonal, 10 * k + len(name))
        if diagonal is not None:
            m["gram/head"] = _gram(WIDTH, False, 100 + k)
        messages.append(m)
    return messages


def _weighted_mean(messages, key):
    total = sum(SAMPLES)
    return sum(n * m[key].double() for n, m in zip(SAMPLES, messages)) / total


def _close(actual, expected, tol=1e-5):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol)


def test_lorm_alternates_factors_b_first(tiny_config):
    server = _server("lorm", tiny_config)
    assert [server.trained_factor(r) for r in range(5)] == list("BABAB")
    assert [_server("lorm", tiny_config, train_matrix="A").trained_factor(r) for r in range(2)] == ["A", "A"]


def test_every_task_starts_from_b_zero_and_a_kaiming(tiny_config):
    server = _server("fedit", tiny_config)
    first = {k: v.clone() for k, v in server.current.items()}
    server.start_task(1)
    for name, (out_features, in_features) in SHAPES.items():
        assert torch.equal(server.current[f"B/{name}"], torch.zeros(out_features, RANK))
        a = server.current[f"A/{name}"]
        assert a.abs().max() <= 1 / math.sqrt(in_features)  # Kaiming-uniform bound with a = √5
        assert not torch.equal(a, first[f"A/{name}"])
    server.start_task(0)
    assert all(torch.equal(server.current[k], first[k]) for k in first if not k.startswith("head"))


@pytest.mark.parametrize("diagonal", [True, False])
def test_lorm_a_round_is_the_a_step_and_regmean_head(tiny_config, diagonal):
    server = _server("lorm", tiny_config)
    instruction = server.open_round(1, (0, CLASSES))
    assert (instruction.phase, instruction.train, instruction.grams) == (FIT, "A", True)
    messages = _messages(server, "A", diagonal)
    for m in messages:
        server.receive(m)
    server.close()
    for name in SHAPES:
        expected = reference.a_step_ref([m[f"A/{name}"] for m in messages], [m[f"gram/{name}"] for m in messages])
        _close(server.current[f"A/{name}"], expected)
    _close(
        server.current["head/weight"],
        reference.regmean_ref([m["head/weight"] for m in messages], [m["gram/head"] for m in messages]),
    )
    _close(server.current["head/bias"], _weighted_mean(messages, "head/bias"))


@pytest.mark.parametrize("diagonal", [True, False])
def test_lorm_b_round_is_the_b_step_also_pre_reduced(tiny_config, diagonal):
    raw, reduced = _server("lorm", tiny_config), _server("lorm", tiny_config, prereduce=True)
    assert not raw.open_round(0, (0, CLASSES)).prereduce and reduced.open_round(0, (0, CLASSES)).prereduce
    messages = _messages(raw, "B", diagonal)
    shared_a = {n: raw.current[f"A/{n}"] for n in SHAPES}
    for m in messages:
        raw.receive(m)
        weighted, projections = project_client(
            shared_a, {n: m[f"B/{n}"] for n in SHAPES}, {n: m[f"gram/{n}"] for n in SHAPES}
        )
        shrunk = {k: v for k, v in m.items() if k.startswith("head") or k in ("num_samples", "gram/head")}
        reduced.receive(
            shrunk | {f"BP/{n}": w for n, w in weighted.items()} | {f"P/{n}": p for n, p in projections.items()}
        )
    raw.close()
    reduced.close()
    for name in SHAPES:
        expected = reference.b_step_ref(
            [m[f"B/{name}"] for m in messages], shared_a[name], [m[f"gram/{name}"] for m in messages]
        )
        _close(raw.current[f"B/{name}"], expected)
        assert torch.equal(raw.current[f"A/{name}"], shared_a[name])
    for key in raw.current:
        _close(reduced.current[key], raw.current[key], tol=1e-6)


@pytest.mark.parametrize("lora_alpha", [None, 4.0])
def test_lorm_cross_task_merge_from_the_second_task(tiny_config, lora_alpha):
    server = _server("lorm", tiny_config, lora_alpha=lora_alpha)
    scale = 1.0 if lora_alpha is None else lora_alpha / RANK
    factors, task_grams = [], []
    for task in range(2):
        server.start_task(task)
        torch.manual_seed(task)
        for name, (out_features, in_features) in SHAPES.items():
            server.current[f"A/{name}"] = torch.randn(RANK, in_features)
            server.current[f"B/{name}"] = torch.randn(out_features, RANK)
        factors.append({k: v.clone() for k, v in server.current.items()})
        instruction = server.open_task_end((2 * task, 2))
        assert instruction.phase == TASK_GRAMS and instruction.grams and not instruction.train
        assert {k for k in instruction.tensors if k.startswith("task")} == {
            f"task{t}/{f}/{n}" for t in range(task) for f in "AB" for n in SHAPES
        }
        for name in SHAPES:  # clients rebuild the server's sum of earlier updates from them, to the bit
            past = torch.zeros(SHAPES[name])
            for t in range(task):
                past += scale * instruction.tensors[f"task{t}/B/{name}"] @ instruction.tensors[f"task{t}/A/{name}"]
            assert torch.equal(past, server.past[name])
        grams = [{n: _gram(shape[1], True, 7 * task + k) for n, shape in SHAPES.items()} for k in range(3)]
        for g in grams:
            server.receive({"num_samples": torch.tensor(5)} | {f"gram/{n}": v for n, v in g.items()})
        server.close_task()
        task_grams.append({n: sum(g[n] for g in grams) for n in SHAPES})
        deltas = server.evaluation_deltas()
        for name in SHAPES:
            if task == 0:  # the first task is evaluated as it is
                expected = scale * factors[0][f"B/{name}"] @ factors[0][f"A/{name}"]
            else:
                expected = reference.cross_task_ref(
                    [scale * f[f"B/{name}"] for f in factors],
                    [f[f"A/{name}"] for f in factors],
                    [g[name] for g in task_grams],
                )
            _close(deltas[name], expected)


def test_lorm_state_round_trips_before_and_after_a_task(tiny_config):
    server = _server("lorm", tiny_config)
    fresh = _server("lorm", tiny_config)
    fresh.load_state_dict(server.state_dict())  # nothing merged across tasks yet
    server.open_task_end((0, 2))
    server.receive({"num_samples": torch.tensor(3)} | {f"gram/{n}": _gram(s[1], True, 1) for n, s in SHAPES.items()})
    server.close_task()
    restored = _server("lorm", tiny_config)
    restored.load_state_dict(server.state_dict())
    server.start_task(1)
    restored.start_task(1)
    for d in (server, restored):
        d.open_task_end((2, 2))
        d.receive({"num_samples": torch.tensor(3)} | {f"gram/{n}": _gram(s[1], True, 2) for n, s in SHAPES.items()})
        d.close_task()
    assert all(torch.equal(server.evaluation_deltas()[n], restored.evaluation_deltas()[n]) for n in SHAPES)


@pytest.mark.parametrize("name, trained", [("fedit", "AB"), ("ffa-lora", "B"), ("centralized", "AB")])
def test_averaging_servers_are_sample_weighted_means(tiny_config, name, trained):
    server = _server(name, tiny_config)
    before = dict(server.current)
    instruction = server.open_round(0, (0, CLASSES))
    assert (instruction.train, instruction.grams) == (trained, False)
    messages = _messages(server, trained, diagonal=None)
    for m in messages:
        server.receive(m)
    server.close()
    for key in server.current:
        if key.startswith("A/") and "A" not in trained:
            assert torch.equal(server.current[key], before[key])
        else:
            _close(server.current[key], _weighted_mean(messages, key))


def _lora_fair_dense_reference(messages, name, lam, steps, lr):
    """Literally: ΔW = Σ p_k B_k A_k, Adam on ΔB over 1 − cos(vec ΔW, vec((B̄ + ΔB) Ā)) + λ‖ΔB‖²."""
    target = sum(n * m[f"B/{name}"].double() @ m[f"A/{name}"].double() for n, m in zip(SAMPLES, messages)) / sum(
        SAMPLES
    )
    b, a = _weighted_mean(messages, f"B/{name}"), _weighted_mean(messages, f"A/{name}")
    delta = torch.zeros_like(b, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=lr * float(b.pow(2).mean().sqrt()))
    for _ in range(steps):
        merged = ((b + delta) @ a).flatten()
        loss = 1 - merged @ target.flatten() / (merged.norm() * target.norm()) + lam * delta.pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return b + delta.detach(), a, target


def test_lora_fair_server_matches_the_dense_reference_and_raises_the_cosine(tiny_config):
    server = _server("lora-fair", tiny_config, lora_fair_steps=30, lora_fair_lr=0.05)
    server.open_round(0, (0, CLASSES))
    messages = _messages(server, "AB", diagonal=None)
    for m in messages:
        server.receive(m)
    server.close()
    for name in SHAPES:
        b, a, target = _lora_fair_dense_reference(messages, name, 0.01, 30, 0.05)
        _close(server.current[f"B/{name}"], b)
        _close(server.current[f"A/{name}"], a)
        plain = _weighted_mean(messages, f"B/{name}") @ a

        def cosine(w, target=target):
            return float(torch.nn.functional.cosine_similarity(w.flatten(), target.flatten(), dim=0))

        assert cosine(server.current[f"B/{name}"].double() @ a) > cosine(plain)


def test_lora_fair_correction_leaves_a_zero_b_alone():
    zero = {"l": torch.zeros(4, 2)}
    out = lora_fair_correction({"l": torch.randn(4, 3)}, zero, {"l": torch.randn(2, 3)}, lam=0.01, steps=5, lr=0.1)
    assert torch.equal(out["l"], torch.zeros(4, 2, dtype=torch.float64))


def test_baselines_evaluate_the_mean_of_the_task_updates(tiny_config):
    server = _server("fedit", tiny_config)
    updates = []
    for task in range(3):
        server.start_task(task)
        for name, (out_features, in_features) in SHAPES.items():
            server.current[f"B/{name}"] = torch.randn(out_features, RANK)
            server.current[f"A/{name}"] = torch.randn(RANK, in_features)
        updates.append({n: server.update(n) for n in SHAPES})
        during = server.evaluation_deltas()  # after a round: the mean including the running task
        assert server.open_task_end((0, 2)) is None
        server.close_task()
        after = server.evaluation_deltas()
        for name in SHAPES:
            expected = sum(u[name] for u in updates) / (task + 1)
            _close(during[name], expected)
            _close(after[name], expected)
    assert isinstance(_server("lorm", tiny_config), LoRM) and set(SERVERS) == {
        "lorm",
        "fedit",
        "ffa-lora",
        "lora-fair",
        "centralized",
    }
