"""The backbone: a timm ViT with LoRA on every blocks.N.attn.qkv / attn.proj / mlp.fc1 / mlp.fc2, the head
trained in full, everything else frozen. One ``AdaptedViT`` is shared by all simulated clients and the server.

Weights are loaded offline only: from ``--pretrained_path`` (timm .safetensors/.pth, or the original .npz), or
from a Hugging Face cache that already holds the model (``HF_HOME``). The embedded default ``digits-vit`` is a
small ViT pretrained on scikit-learn's 8×8 digits (a source disjoint from the MNIST digits it is then adapted
to); its weights ship with the package (``EMBEDDED_WEIGHTS``, the same file on every machine) and are loaded like
any other local file. ``pretrain_on_digits`` made them: ``python -m lorm_ext.fcil.pretrain OUT.safetensors``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn
from torchvision.transforms import v2

from ..files import atomic_write
from ..gram import VIT_LORA_PATTERN, linear_layers
from ..progress import Progress
from ..validation import LayerError, check_rank_fits
from .config import EMBEDDED_NETWORK, ConfigError, RunConfig
from .data import InputSpec, resize_normalise
from .protocol import HEAD

logger = logging.getLogger(__name__)

# The embedded default backbone: a timm VisionTransformer small enough for a 2-core CPU.
EMBEDDED_ARCH = "vit_tiny_patch16_224"
EMBEDDED_KWARGS = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0)
EMBEDDED_PRETRAIN_EPOCHS = 40
# Made by ``python -m lorm_ext.fcil.pretrain`` (pretrain_on_digits, seed 0) with environment.CPU_ENVIRONMENT on an
# AVX-512 Xeon; float32 training, so another CPU may give another file: the committed one is the reference.
EMBEDDED_WEIGHTS = os.path.join(
    os.path.dirname(__file__), "weights", f"digits-vit-e{EMBEDDED_PRETRAIN_EPOCHS}.safetensors"
)
EMBEDDED_SHA256 = "b419cc2101fe3fae6eef2c244309e0b4e669e0c5af13d132907f07b76e99b4eb"


class LoRALinear(nn.Module):
    """y = W0 x + b + s·B A x with W0, b frozen. When ``dense_delta`` is set the layer computes (W0 + Δ) x + b
    instead and ignores its factors: how the server's merged (not low-rank) updates are evaluated."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scaling = scaling
        self.lora_A = nn.Parameter(base.weight.new_empty(rank, base.in_features))
        self.lora_B = nn.Parameter(base.weight.new_zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dense_delta: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.dense_delta is not None:
            return F.linear(x, self.base.weight + self.dense_delta, self.base.bias)
        return self.base(x) + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)


class AdaptedViT:
    """A timm ViT whose backbone linear layers carry LoRA factors; the head is a plain nn.Linear."""

    def __init__(self, vit: nn.Module, rank: int, scaling: float):
        self.vit = vit
        self.layers: dict[str, LoRALinear] = {}
        for name, linear in backbone_linears(vit).items():
            parent, _, child = name.rpartition(".")
            self.layers[name] = LoRALinear(linear, rank, scaling)
            setattr(vit.get_submodule(parent), child, self.layers[name])
        for p in vit.parameters():  # frozen; each client step switches on what it trains
            p.requires_grad_(False)
        self.head: nn.Linear = vit.get_submodule(HEAD)

    @property
    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        return {name: (layer.out_features, layer.in_features) for name, layer in self.layers.items()}

    def factors(self, which: str) -> dict[str, nn.Parameter]:
        """The A or the B factor of every adapted layer."""
        return {name: getattr(layer, f"lora_{which}") for name, layer in self.layers.items()}

    def head_parameters(self) -> dict[str, nn.Parameter]:
        return {"weight": self.head.weight, "bias": self.head.bias}

    @torch.no_grad()
    def load(self, tensors: Mapping[str, Tensor]) -> None:
        """Copies in whatever the mapping holds of "A/<layer>", "B/<layer>", "head/weight", "head/bias"."""
        for key, value in tensors.items():
            kind, _, name = key.partition("/")
            if kind in ("A", "B"):
                self.factors(kind)[name].copy_(value)
            elif kind == HEAD:
                self.head_parameters()[name].copy_(value)

    @contextmanager
    def dense(self, deltas: Mapping[str, Tensor]) -> Iterator[None]:
        """Runs the model as W0 + Δ per adapted layer (no adapter) inside the block."""
        try:
            for name, layer in self.layers.items():
                layer.dense_delta = deltas[name]
            yield
        finally:
            for layer in self.layers.values():
                layer.dense_delta = None

    def input_spec(self) -> InputSpec:
        return input_spec(self.vit)


def backbone_linears(vit: nn.Module) -> dict[str, nn.Module]:
    """The layers LoRA adapts: every blocks.N.attn.qkv, attn.proj, mlp.fc1, mlp.fc2 (gram.VIT_LORA_PATTERN)."""
    return linear_layers(vit, VIT_LORA_PATTERN)


def input_spec(vit: nn.Module) -> InputSpec:
    """Channels and size of the patch embedding; mean and std of the weights' preprocessing."""
    channels = vit.patch_embed.proj.in_channels
    mean, std = (tuple(vit.pretrained_cfg[k]) for k in ("mean", "std"))
    if len(mean) != channels:  # a 1-channel variant of an RGB configuration
        mean, std = mean[:1] * channels, std[:1] * channels
    return InputSpec(channels, vit.patch_embed.img_size[0], mean, std)


def _timm_model(network: str, num_classes: int, weights: str | None) -> nn.Module:
    arch, kwargs = (EMBEDDED_ARCH, EMBEDDED_KWARGS) if network == EMBEDDED_NETWORK else (network, {})
    if weights is None:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    # The original Google checkpoints are .npz and need timm's custom loader; everything else is a state dict.
    overlay = dict(file=weights, custom_load=weights.endswith(".npz"))
    if network == EMBEDDED_NETWORK:
        overlay["input_size"] = (kwargs["in_chans"], kwargs["img_size"], kwargs["img_size"])
    try:
        return timm.create_model(
            arch, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes, **kwargs
        )
    except Exception as error:  # safetensors, torch.load and timm report unreadable files with many exception types
        remedy = (
            "reinstall lorm_ext (python -m lorm_ext.fcil.pretrain FILE pretrains one to pass as --pretrained_path)"
            if weights == EMBEDDED_WEIGHTS
            else "pass a readable timm checkpoint of this network with --pretrained_path, or --pretrained False"
        )
        problem = f"{type(error).__name__}: {str(error).partition(chr(10))[0]}"
        raise ConfigError(f"{weights}: cannot load {arch} weights from it ({problem}); {remedy}") from None


def _augment_digits(images: Tensor, affine: v2.RandomAffine) -> Tensor:
    """Digits in [0, 1] drawn differently: shifted, rotated, shrunk, strokes thicker or thinner, contrast."""
    images = torch.stack([affine(image) for image in images])
    coin, side = torch.rand(2).tolist()
    if coin < 0.5:
        images = F.max_pool2d(images, 3, 1, 1) if side < 0.5 else -F.max_pool2d(-images, 3, 1, 1)
    return images ** math.exp(torch.empty(()).uniform_(-0.7, 0.7).item())


def pretrain_on_digits(path: str, epochs: int = EMBEDDED_PRETRAIN_EPOCHS, seed: int = 0) -> None:
    """The embedded backbone: ``digits-vit`` trained to classify scikit-learn's 1797 8×8 digits (upsampled to
    16×16, augmented so that the features carry over to other handwriting), saved atomically as a
    safetensors checkpoint at ``path``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    torch.manual_seed(seed)  # model init and every augmentation draw
    model = _timm_model(EMBEDDED_NETWORK, 10, None)
    spec = input_spec(model)
    images = resize_normalise(torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0, spec, normalise=False)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    affine = v2.RandomAffine(degrees=15, translate=(0.15, 0.15), scale=(0.6, 1.0))
    batch, steps_per_epoch = 64, math.ceil(len(labels) / 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=epochs * steps_per_epoch)
    model.train()
    with Progress(epochs, "pretraining digits-vit on sklearn digits", "epoch", logger) as progress:
        for _ in range(epochs):
            order = torch.randperm(len(labels))
            for start in range(0, len(labels), batch):
                idx = order[start : start + batch]
                x = v2.functional.normalize(_augment_digits(images[idx], affine), list(spec.mean), list(spec.std))
                loss = F.cross_entropy(model(x), labels[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
            progress.update(f"loss {loss.item():.3f}")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp))


def resolve_weights(config: RunConfig) -> str | None:
    """The local file to load, or None for random init; a ConfigError naming the options when there is none."""
    if not config.pretrained:
        return None
    if config.pretrained_path is not None:
        return config.pretrained_path
    if config.network == EMBEDDED_NETWORK:
        if not os.path.isfile(EMBEDDED_WEIGHTS):
            raise ConfigError(
                f"the embedded backbone {EMBEDDED_WEIGHTS!r} is missing from the installation: reinstall lorm_ext, "
                f"or pass --pretrained_path FILE (python -m lorm_ext.fcil.pretrain FILE pretrains one)"
            )
        return EMBEDDED_WEIGHTS
    from huggingface_hub import try_to_load_from_cache

    hub_id = timm.models.get_pretrained_cfg(config.network).hf_hub_id
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename) if hub_id else None
        if isinstance(found, str):
            return found
    raise ConfigError(
        f"no pretrained weights for {config.network!r} on this machine (nothing is downloaded). Either pass "
        f"--pretrained_path FILE (a timm .safetensors/.pth checkpoint or the original .npz), or fill the Hugging "
        f'Face cache (HF_HOME) with {hub_id!r} on a machine with internet, e.g. python -c "import timm; '
        f"timm.create_model('{config.network}', pretrained=True)\"; --pretrained False runs from random weights"
    )


def check_architecture(config: RunConfig) -> InputSpec:
    """Known network, layers to adapt, rank within every layer's width: checked on the meta device (no weights,
    no memory) before anything is loaded or trained. Returns the network's input specification."""
    if config.network != EMBEDDED_NETWORK and not timm.is_model(config.network):
        raise ConfigError(f"--network {config.network!r} is neither {EMBEDDED_NETWORK!r} nor a timm model name")
    with torch.device("meta"):
        vit = _timm_model(config.network, 1, None)
    layers = backbone_linears(vit)
    if not layers:
        raise ConfigError(f"--network {config.network!r} has no blocks.N.attn.qkv/attn.proj/mlp.fc1/mlp.fc2 layers")
    for name, linear in layers.items():
        try:
            check_rank_fits(name, config.r, linear.out_features, linear.in_features)
        except LayerError as error:
            raise ConfigError(f"--r {config.r}: {error}") from None
    return input_spec(vit)


def build_model(config: RunConfig, num_classes: int, weights: str | None) -> AdaptedViT:
    """The backbone with LoRA injected; the head (num_classes outputs, timm's init) is seeded by config.seed."""
    torch.manual_seed(config.seed)
    vit = _timm_model(config.network, num_classes, weights)
    return AdaptedViT(vit.to(config.device), config.r, config.lora_scaling)
