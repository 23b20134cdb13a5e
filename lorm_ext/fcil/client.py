"""The client step, the same function for every strategy: the server's ``Instruction`` says what to train and
what to report; the client loads the server's tensors into the shared model, trains locally and returns a
message of tensors. It holds no state between calls: everything it needs is in the instruction, the run
configuration, its own data and its id, and its random numbers come from a seed derived from
(seed, task, round, client), so the same call gives the same message in this process or in another one.

Message keys (all tensors): "A/<layer>", "B/<layer>" (the trained factors), "head/weight", "head/bias",
"gram/<layer>" and "gram/head" (Grams after shrinkage, a vector when diagonal), "BP/<layer>" and "P/<layer>"
(a pre-reduced B-round: B_k P_k and P_k = A G_k Aᵀ instead of B_k and G_k), "num_samples".
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..gram import GramCollector
from ..merge import project_client
from .config import SEED_CLIENT, RunConfig, derive_seed
from .data import ImageSet, batches
from .model import HEAD, AdaptedViT

FIT, TASK_GRAMS = "fit", "task_grams"


@dataclass
class Instruction:
    """What the server sends every selected client (for Flower: the scalars as a ConfigRecord, the tensors as
    an ArrayRecord).

    phase: FIT (train, then report factors, head and, if ``grams``, the round's Grams) or TASK_GRAMS (report
    the Grams of the server's final model of the task; no training). ``train``: the factors to train, "A", "B"
    or "AB". ``prereduce``: in a B-round send (B_k P_k, P_k) instead of (B_k, G_k). Tensors: "A/<layer>",
    "B/<layer>", "head/weight", "head/bias" to start from and, when Grams are asked for, the adapters of the
    finished tasks, "task<t>/A/<layer>" and "task<t>/B/<layer>": Grams are taken through
    W0 + (Σ_t s·B_t A_t + s·B A)/(task + 1) as the authors' (r × (in + out) per task and layer, not in × out).
    """

    phase: str
    task: int
    round: int
    class_offset: int
    num_task_classes: int
    train: str = ""
    grams: bool = False
    prereduce: bool = False
    tensors: dict[str, Tensor] = field(default_factory=dict)


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
            past += model.scaling * inst.tensors[f"task{t}/B/{name}"] @ inst.tensors[f"task{t}/A/{name}"]
        dense[name] = (past + model.scaling * layer.lora_B @ layer.lora_A) / (inst.task + 1)
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


def message_shapes(
    instruction: Instruction,
    config: RunConfig,
    layer_shapes: Mapping[str, tuple[int, int]],
    head_shape: tuple[int, int],
) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor ``client_step`` sends for this instruction, by message key (without
    "num_samples"): what a server of another runtime checks replies against."""
    r, (classes, features) = config.r, head_shape
    shapes: dict[str, tuple[int, ...]] = {}
    if instruction.phase == FIT:
        for factor in instruction.train:
            for name, (out_features, in_features) in layer_shapes.items():
                shapes[f"{factor}/{name}"] = (r, in_features) if factor == "A" else (out_features, r)
        shapes |= {f"{HEAD}/weight": (classes, features), f"{HEAD}/bias": (classes,)}
        if instruction.grams:
            shapes[f"gram/{HEAD}"] = (features, features)  # the head's Gram is always full
    if not instruction.grams:
        return shapes
    for name, (out_features, in_features) in layer_shapes.items():
        if instruction.prereduce and instruction.train == "B":
            del shapes[f"B/{name}"]
            shapes |= {f"BP/{name}": (out_features, r), f"P/{name}": (r, r)}
        else:
            shapes[f"gram/{name}"] = (
                (in_features,) if config.backbone_alpha == 0 else (in_features, in_features)
            )
    return shapes


def client_step(
    model: AdaptedViT, images: ImageSet, indices: np.ndarray, inst: Instruction, config: RunConfig, client_id: int
) -> ClientReply:
    """One client's work for one instruction (see the module docstring)."""
    seed = derive_seed(config.seed, SEED_CLIENT, inst.task, inst.round, client_id)
    torch.manual_seed(seed)  # augmentation draws from the global generator
    generator = torch.Generator().manual_seed(seed)
    device = model.head.weight.device
    model.load(inst.tensors)
    message: dict[str, Tensor] = {"num_samples": torch.tensor(len(indices))}
    start = clock(device)
    if inst.phase == FIT:
        _train(model, images, indices, inst, config, generator)
        for factor in inst.train:
            message.update({f"{factor}/{n}": p.detach().clone() for n, p in model.factors(factor).items()})
        message.update({f"head/{n}": p.detach().clone() for n, p in model.head_parameters().items()})
    trained = clock(device)
    if inst.grams:
        grams = _grams(model, images, indices, inst, config)
        head_gram = grams.pop(HEAD)
        if inst.phase == FIT:
            message[f"gram/{HEAD}"] = head_gram
        if inst.prereduce and inst.train == "B":
            # computed in float64 like the server's merge, sent in the Grams' own dtype
            factors_b = {n: message.pop(f"B/{n}") for n in grams}
            weighted, projections = project_client(model.factors("A"), factors_b, grams, dtype=torch.float64)
            dtype = head_gram.dtype
            message.update({f"BP/{n}": t.to(dtype) for n, t in weighted.items()})
            message.update({f"P/{n}": t.to(dtype) for n, t in projections.items()})
        else:
            message.update({f"gram/{n}": g for n, g in grams.items()})
    return ClientReply(message, {"train": trained - start, "gram": clock(device) - trained})
