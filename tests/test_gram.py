"""GramCollector on a timm ViT, and Gram shrinkage, against the reference."""

from __future__ import annotations

import pytest
import timm
import torch
from lorm_testing import REL_TOL, assert_rel_close, random_gram

from lorm_ext import GramCollector, linear_layers, shrink_gram
from lorm_ext import reference as ref


def tiny_vit(device):
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7
    )
    return model.to(device).eval()


def captured_inputs(model, names):
    """The raw inputs of the named layers, recorded by plain hooks: what the collector must reduce."""
    seen = {name: [] for name in names}
    handles = [
        module.register_forward_hook(lambda m, args, out, name=name: seen[name].append(args[0].detach().clone()))
        for name, module in model.named_modules()
        if name in names
    ]
    return seen, handles


def test_default_pattern_selects_the_lora_layers_and_the_head():
    names = set(linear_layers(tiny_vit("cpu")))
    expected = {f"blocks.{i}.{layer}" for i in range(2) for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert names == expected | {"head"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_collector_matches_reference_on_a_vit(device, dtype):
    model = tiny_vit(device)
    diagonal = lambda name: "fc" in name  # noqa: E731  (mixed: diagonal Grams for the MLP layers only)
    collector = GramCollector(model, diagonal=diagonal, dtype=dtype)
    seen, handles = captured_inputs(model, collector.layers)
    batches = [torch.randn(5, 3, 32, 32, device=device) for _ in range(3)]
    with torch.no_grad(), collector:
        for images in batches:
            model(images)
    for h in handles:
        h.remove()
    assert set(collector.grams) == set(collector.layers)
    for name, gram in collector.grams.items():
        expected = None
        for x in seen[name]:
            expected = ref.gram_ref(x, expected, diagonal=diagonal(name), dtype=torch.float64)
        assert gram.dtype == dtype and gram.dim() == (1 if diagonal(name) else 2)
        assert_rel_close(gram, expected, REL_TOL[dtype])
        tokens_per_batch = 5 if name == "head" else 5 * 17  # 16 patches + the class token
        assert collector.num_tokens[name] == 3 * tokens_per_batch


def test_hooks_live_only_inside_the_with_block():
    model = tiny_vit("cpu")
    collector = GramCollector(model)
    with torch.no_grad():
        with collector:
            model(torch.randn(2, 3, 32, 32))
        first = {k: v.clone() for k, v in collector.grams.items()}
        model(torch.randn(2, 3, 32, 32))  # outside: nothing accumulates
    assert all(torch.equal(first[k], collector.grams[k]) for k in first)
    collector.reset()
    assert collector.grams == {} and collector.num_tokens == {}


def test_collector_under_autograd_and_bf16_autocast():
    model = tiny_vit("cpu").train()
    seen = []  # the head's input as autocast hands it to the layer (bf16, part of the graph)
    model.head.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    collector = GramCollector(model, pattern=r"head$")
    with collector, torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(3, 3, 32, 32)).sum().backward()
    gram = collector.grams["head"]
    assert gram.dtype == torch.float32
    assert_rel_close(gram, ref.gram_ref(seen[0].reshape(-1, seen[0].shape[-1]), dtype=torch.float64), REL_TOL[torch.float32])


def test_collector_errors():
    model = tiny_vit("cpu")
    with pytest.raises(ValueError, match="no linear layer of the model matches the pattern 'nothing'"):
        GramCollector(model, pattern="nothing")
    with pytest.raises(ValueError, match="float32 or float64"):
        GramCollector(model, dtype=torch.bfloat16)
    collector = GramCollector(model)
    with collector, pytest.raises(RuntimeError, match="already collecting"):
        collector.__enter__()


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_shrinkage_matches_reference(device, alpha):
    gram = random_gram(30, 40, device=device)
    assert_rel_close(shrink_gram(gram, alpha), ref.shrink_gram_ref(gram, alpha), 1e-15)
    diagonal = torch.rand(30, device=device)
    assert torch.equal(shrink_gram(diagonal, alpha), diagonal)


def test_shrinkage_extremes_and_collector_shrunk():
    gram = random_gram(6, 9)
    assert torch.equal(shrink_gram(gram, 1.0), gram)
    assert torch.equal(shrink_gram(gram, 0.0), torch.diag(torch.diagonal(gram)))
    with pytest.raises(ValueError, match="alpha must be in"):
        shrink_gram(gram, 1.5)
    model = tiny_vit("cpu")
    collector = GramCollector(model)
    with torch.no_grad(), collector:
        model(torch.randn(2, 3, 32, 32))
    shrunk = collector.shrunk(lambda name: 0.5 if name == "head" else 0.0)
    assert torch.equal(shrunk["head"], ref.shrink_gram_ref(collector.grams["head"], 0.5))
    qkv = collector.grams["blocks.0.attn.qkv"]
    assert torch.equal(shrunk["blocks.0.attn.qkv"], torch.diag(torch.diagonal(qkv)))
