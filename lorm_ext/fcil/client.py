"""The client step, the same function for every strategy: the server's ``Instruction`` says what to train and
what to report; the client loads the server's tensors into the shared model, trains locally and returns a
message of tensors laid out as ``protocol.layout`` says. It holds no state between calls: everything it needs
is in the instruction, the run configuration, its own data and its id, and its random numbers come from a seed
derived from (seed, task, round, client), so the same call gives the same message in this process or in
another one. The message keys are ``protocol``'s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..gram import GramCollector
from ..merge import project_client
from .config import SEED_CLIENT, RunConfig, derive_seed
from .data import ImageSet, batches
from .model import AdaptedViT
from .protocol import (
    FIT,
    HEAD,
    NUM_SAMPLES,
    Instruction,
    delta_weight,
    factor_key,
    gram_key,
    layout,
    projection_keys,
    task_factor_key,
)


@dataclass
class ClientReply:
    message: dict[str, Tensor]
    seconds: dict[str, float]  # "train", "gram": where the client's time went


def tensor_bytes(tensors: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def clock(device: torch.device) -> float:
    """Seconds, after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _train(
    model: AdaptedViT, images: ImageSet, indices: np.ndarray, inst: Instruction, config: RunConfig, generator
) -> None:
    """AdamW on the trained factors (their own lr) and the head (lr); loss on the current task's classes."""
    lrs = config.factor_lrs
    groups = [{"params": list(model.factors(f).values()), "lr": lrs[f]} for f in inst.train]
    groups.append({"params": list(model.head_parameters().values()), "lr": config.lr})
    trained = [p for group in groups for p in group["params"]]
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.wd_reg)
    device = model.head.weight.device
    lo, hi = inst.class_offset, inst.class_offset + inst.num_task_classes
    model.vit.train()
    for _ in range(config.num_epochs):
        for x, y in batches(images, indices, config.batch_size, train=True, generator=generator):
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model.vit(x)[:, lo:hi], y - lo)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    for p in trained:
        p.requires_grad_(False)


@torch.no_grad()
def _grams(
    model: AdaptedViT, images: ImageSet, indices: np.ndarray, inst: Instruction, config: RunConfig
) -> dict[str, Tensor]:
    """Grams of every adapted layer's and the head's inputs over regmean_rounds passes of the (augmented)
    training data, through W0 + (Σ_t s·B_t A_t + s·B A)/(task + 1); shrunk by α (backbone, head).
    α_backbone = 0 takes the diagonal fast path."""
    dense = {}
    for name, layer in model.layers.items():
        past = torch.zeros_like(layer.base.weight)
        for t in range(inst.task):  # the server's running sum, term by term: the same floats
            b, a = (inst.tensors[task_factor_key(t, factor, name)] for factor in "BA")
            past += delta_weight(config, b, a)
        dense[name] = (past + delta_weight(config, layer.lora_B, layer.lora_A)) / (inst.task + 1)
    diagonal_backbone = config.backbone_alpha == 0
    collector = GramCollector(
        model.vit,
        diagonal=lambda name: diagonal_backbone and name != HEAD,
        dtype=torch.float64 if config.gram_dtype == "64" else torch.float32,
    )
    device = model.head.weight.device
    model.vit.eval()
    with model.dense(dense), collector:
        for _ in range(config.regmean_rounds):
            for x, _ in batches(images, indices, config.batch_size, train=True):
                model.vit(x.to(device))
    return collector.shrunk(lambda name: config.alpha_regmean_head if name == HEAD else config.backbone_alpha)


def client_step(
    model: AdaptedViT, images: ImageSet, indices: np.ndarray, inst: Instruction, config: RunConfig, client_id: int
) -> ClientReply:
    """One client's work for one instruction (see the module docstring)."""
    seed = derive_seed(config.seed, SEED_CLIENT, inst.task, inst.round, client_id)
    torch.manual_seed(seed)  # augmentation draws from the global generator
    generator = torch.Generator().manual_seed(seed)
    device = model.head.weight.device
    model.load(inst.tensors)
    what = layout(inst)
    message: dict[str, Tensor] = {NUM_SAMPLES: torch.tensor(len(indices))}
    start = clock(device)
    if inst.phase == FIT:
        _train(model, images, indices, inst, config, generator)
        for factor in what.factors:
            message.update({factor_key(factor, n): p.detach().clone() for n, p in model.factors(factor).items()})
    if what.head:
        message.update({f"{HEAD}/{n}": p.detach().clone() for n, p in model.head_parameters().items()})
    trained = clock(device)
    if inst.grams:
        grams = _grams(model, images, indices, inst, config)
        head_gram = grams.pop(HEAD)
        if what.head_gram:
            message[gram_key(HEAD)] = head_gram
        if what.projections:
            # computed in float64 like the server's merge, sent in the Grams' own dtype
            factors_b = {n: p.detach() for n, p in model.factors("B").items()}
            weighted, projections = project_client(model.factors("A"), factors_b, grams, dtype=torch.float64)
            message.update({projection_keys(n)[0]: t.to(head_gram.dtype) for n, t in weighted.items()})
            message.update({projection_keys(n)[1]: t.to(head_gram.dtype) for n, t in projections.items()})
        if what.layer_grams:
            message.update({gram_key(n): g for n, g in grams.items()})
    return ClientReply(message, {"train": trained - start, "gram": clock(device) - trained if inst.grams else 0.0})
