"""The model (LoRA injection, dense evaluation, weights loading) and the client step (messages, determinism,
pre-reduced B-rounds give the same merged model in far fewer bytes)."""

from __future__ import annotations

import fnmatch
import os
import shutil

import numpy as np
import pytest
import timm
import torch
from lorm_testing import seeded_model
from safetensors.torch import load_file

from lorm_ext.fcil import model as model_module
from lorm_ext.fcil.client import client_step, tensor_bytes
from lorm_ext.fcil.config import ConfigError
from lorm_ext.fcil.environment import file_sha256
from lorm_ext.fcil.model import (
    EMBEDDED_ARCH,
    EMBEDDED_KWARGS,
    EMBEDDED_SHA256,
    EMBEDDED_WEIGHTS,
    HEAD,
    build_model,
    resolve_weights,
)
from lorm_ext.fcil.protocol import message_shapes
from lorm_ext.fcil.strategies import SERVERS


def test_lora_injection_leaves_outputs_unchanged_while_b_is_zero(tiny_config):
    # build_model seeds the same way: identical backbone and head
    plain = seeded_model(lambda: timm.create_model(EMBEDDED_ARCH, pretrained=False, num_classes=4, **EMBEDDED_KWARGS))
    model = build_model(tiny_config(r=3, seed=0), 4, None)
    model.vit.eval()
    assert set(model.layers) == {
        f"blocks.{i}.{n}" for i in range(4) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    }
    assert all(torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B)) for layer in model.layers.values())
    assert all(layer.lora_A.abs().sum() > 0 for layer in model.layers.values())
    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        expected = plain(x)
        assert torch.equal(model.vit(x), expected)
        with model.dense({n: torch.zeros(s) for n, s in model.layer_shapes.items()}):
            assert torch.equal(model.vit(x), expected)
    assert not any(p.requires_grad for p in model.vit.parameters())  # the client switches on what it trains


def test_dense_update_equals_the_adapter(tiny_config):
    model = build_model(tiny_config(r=2, lora_alpha=6.0), 4, None)
    torch.manual_seed(1)
    for layer in model.layers.values():
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        adapted = model.vit(x)
        deltas = {n: 3.0 * layer.lora_B @ layer.lora_A for n, layer in model.layers.items()}
        with model.dense(deltas):
            torch.testing.assert_close(model.vit(x), adapted, rtol=1e-5, atol=1e-5)


def _assert_loaded(model, path: str) -> None:
    """Every backbone tensor of the file is in the model (adapted layers keep theirs under .base)."""
    loaded = model.vit.state_dict()
    for key, value in load_file(path).items():
        module, _, parameter = key.rpartition(".")
        if module != HEAD:
            torch.testing.assert_close(loaded[f"{module}.base.{parameter}" if module in model.layers else key], value)


def test_local_checkpoint_loading(tmp_path, tiny_config, digits_weights):
    path = str(tmp_path / "digits.safetensors")
    shutil.copy(digits_weights, path)
    model = build_model(tiny_config(pretrained_path=path), 4, path)
    _assert_loaded(model, path)
    assert model.head.out_features == 4  # a fresh head for the task's classes


def test_the_packaged_backbone_is_the_recorded_file(tiny_config):
    path = resolve_weights(tiny_config(pretrained=True))
    assert path == EMBEDDED_WEIGHTS and file_sha256(path) == EMBEDDED_SHA256
    model = build_model(tiny_config(pretrained=True), 10, path)
    _assert_loaded(model, path)
    # a pip install carries it: the package-data glob of pyproject.toml matches the file
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "pyproject.toml"), "rb") as f:
        globs = tomllib.load(f)["tool"]["setuptools"]["package-data"]["lorm_ext.fcil"]
    package_dir = os.path.dirname(model_module.__file__)
    assert any(fnmatch.fnmatch(os.path.relpath(EMBEDDED_WEIGHTS, package_dir), g) for g in globs)


def test_a_missing_packaged_backbone_is_a_clear_error(tmp_path, monkeypatch, tiny_config):
    monkeypatch.setattr(model_module, "EMBEDDED_WEIGHTS", str(tmp_path / "gone.safetensors"))
    with pytest.raises(ConfigError, match=r"embedded backbone .*gone.safetensors' is missing.*--pretrained_path"):
        resolve_weights(tiny_config(pretrained=True))


def test_weights_from_the_hugging_face_cache_or_a_clear_error(tmp_path, monkeypatch, tiny_config):
    import huggingface_hub
    from safetensors.torch import save_file

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    config = tiny_config(network="vit_tiny_patch16_224.augreg_in21k", pretrained=True, r=4)
    with pytest.raises(ConfigError, match="--pretrained_path FILE.*Hugging Face cache"):
        resolve_weights(config)
    # the layout huggingface_hub leaves behind after a download
    repo = tmp_path / "models--timm--vit_tiny_patch16_224.augreg_in21k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc")
    (repo / "snapshots" / "abc").mkdir(parents=True)
    weights = timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict()
    save_file(weights, str(repo / "snapshots" / "abc" / "model.safetensors"))
    path = resolve_weights(config)
    assert path == str(repo / "snapshots" / "abc" / "model.safetensors")
    model = build_model(config, 10, path)
    torch.testing.assert_close(model.layers["blocks.3.mlp.fc1"].base.weight, weights["blocks.3.mlp.fc1.weight"])
    assert model.input_spec().size == 224 and model.input_spec().channels == 3


@pytest.fixture
def lorm_setup(tiny_config, four_digits):
    def make(**overrides):
        config = tiny_config(strategy="lorm", r=2, **overrides)
        model = build_model(config, four_digits.num_classes, None)
        server = SERVERS["lorm"](config, model.layer_shapes, model.head_parameters())
        server.start_task(0)
        return config, model, server

    return make


def assert_shapes_announced(message, instruction, config, model):
    """The message holds exactly what message_shapes announces (what other runtimes check replies against)."""
    expected = message_shapes(instruction, config, model.layer_shapes, tuple(model.head.weight.shape))
    assert {k: tuple(v.shape) for k, v in message.items() if k != "num_samples"} == expected


def test_client_messages_and_determinism(lorm_setup, four_digits):
    config, model, server = lorm_setup()
    indices = np.flatnonzero(four_digits.train.labels < 2)[:40]
    instruction = server.open_round(0, (0, 2))
    first = client_step(model, four_digits.train, indices, instruction, config, client_id=4)
    again = client_step(model, four_digits.train, indices, instruction, config, client_id=4)
    other = client_step(model, four_digits.train, indices, instruction, config, client_id=5)
    assert_shapes_announced(first.message, instruction, config, model)
    assert first.message.keys() == again.message.keys()
    assert all(torch.equal(first.message[k], again.message[k]) for k in first.message)
    assert not torch.equal(first.message["head/weight"], other.message["head/weight"])  # its own shuffling
    layer = next(iter(model.layers))
    assert first.message[f"gram/{layer}"].dim() == 1  # α_backbone = 0: diagonal Grams
    assert first.message["gram/head"].dim() == 2 and int(first.message["num_samples"]) == 40
    assert not any(k.startswith("A/") for k in first.message)  # round 0 trains B only
    assert not torch.equal(first.message[f"B/{layer}"], torch.zeros_like(first.message[f"B/{layer}"]))
    task_end = server.open_task_end((0, 2))
    grams = client_step(model, four_digits.train, indices, task_end, config, 4).message
    assert_shapes_announced(grams, task_end, config, model)
    assert {k.partition("/")[0] for k in grams} == {"gram", "num_samples"} and "gram/head" not in grams
    assert first.seconds["train"] > 0 and first.seconds["gram"] > 0


@pytest.mark.parametrize("gram_dtype, tolerance", [("64", 1e-10), ("32", 1e-4)])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_pre_reduced_b_round_gives_the_same_merged_model(lorm_setup, four_digits, gram_dtype, tolerance, alpha):
    """Same merged B and head with (B_k P_k, P_k) as with (B_k, G_k); with full Grams (α > 0) the messages shrink
    from in × in to r × r per layer. With diagonal Grams (α = 0) there is little to save."""
    merged, sent = {}, {}
    for prereduce in (False, True):
        config, model, server = lorm_setup(prereduce=prereduce, gram_dtype=gram_dtype, alpha_regmean_backbone=alpha)
        instruction = server.open_round(0, (0, 2))
        sent[prereduce] = 0
        for client in range(3):
            indices = np.flatnonzero(four_digits.train.labels < 2)[client::3]
            reply = client_step(model, four_digits.train, indices, instruction, config, client)
            assert any(k.startswith("BP/") for k in reply.message) == prereduce
            assert_shapes_announced(reply.message, instruction, config, model)
            sent[prereduce] += tensor_bytes(reply.message)
            server.receive(reply.message)
        server.close()
        merged[prereduce] = server.current
    for key, value in merged[False].items():
        torch.testing.assert_close(merged[True][key], value, rtol=tolerance, atol=tolerance * value.abs().max().item())
    if alpha > 0:
        assert sent[True] < sent[False] / 3


def test_fedit_and_ffa_messages(tiny_config, four_digits):
    for name, factors in (("fedit", {"A", "B"}), ("ffa-lora", {"B"})):
        config = tiny_config(strategy=name)
        model = build_model(config, 4, None)
        server = SERVERS[name](config, model.layer_shapes, model.head_parameters())
        server.start_task(0)
        reply = client_step(model, four_digits.train, np.arange(20), server.open_round(0, (0, 2)), config, 0)
        kinds = {k.partition("/")[0] for k in reply.message}
        assert kinds == factors | {"head", "num_samples"}


@pytest.mark.parametrize("factor, round_", [("B", 0), ("A", 1)])
def test_learning_rate_zero_freezes_that_factor_as_the_authors(lorm_setup, four_digits, factor, round_):
    """--lr_A 0 / --lr_B 0 train that factor with step size 0 (the authors' ``lr_X if lr_X >= 0``); < 0 is --lr."""
    indices = np.flatnonzero(four_digits.train.labels < 2)[:32]
    layer = "blocks.0.attn.qkv"
    moved = {}
    for lr in (0.0, -1.0):
        config, model, server = lorm_setup(**{f"lr_{factor}": lr})
        assert config.factor_lrs[factor] == (0.0 if lr == 0 else config.lr)
        server.current[f"B/{layer}"] = torch.randn_like(server.current[f"B/{layer}"])  # so that A gets a gradient
        instruction = server.open_round(round_, (0, 2))
        assert instruction.train == factor
        sent = instruction.tensors[f"{factor}/{layer}"]
        message = client_step(model, four_digits.train, indices, instruction, config, 0).message
        moved[lr] = not torch.equal(message[f"{factor}/{layer}"], sent)
        assert not torch.equal(message["head/weight"], instruction.tensors["head/weight"])  # the head trains at --lr
    assert moved == {0.0: False, -1.0: True}


def test_negative_backbone_alpha_means_the_head_alpha(lorm_setup, four_digits):
    indices = np.flatnonzero(four_digits.train.labels < 2)[:24]
    grams = {}
    for alpha in (-1.0, 0.3):
        config, model, server = lorm_setup(alpha_regmean_backbone=alpha, alpha_regmean_head=0.3)
        assert config.backbone_alpha == 0.3
        instruction = server.open_round(0, (0, 2))
        message = client_step(model, four_digits.train, indices, instruction, config, 0).message
        assert_shapes_announced(message, instruction, config, model)
        grams[alpha] = message
    assert grams[-1.0].keys() == grams[0.3].keys()
    assert all(torch.equal(grams[-1.0][k], grams[0.3][k]) for k in grams[0.3])
    assert grams[-1.0]["gram/blocks.0.mlp.fc1"].dim() == 2  # full Grams, not the diagonal fast path
