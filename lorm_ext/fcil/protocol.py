"""The FCIL protocol between the server and its clients, in one place: the units of a run, who takes part,
the ``Instruction`` the server sends, the keys and the layout of the message a client sends back, how ΔW is
formed from a pair of factors, and how a server opens and closes one unit. The client (``client``), the
servers (``strategies``), the driver and the Flower apps all import it; none of them spells a key itself.

A run is a sequence of units: per task, ``num_comm_rounds`` rounds (task, round) and one task end (task, None).
Per unit, with ``server`` a ``strategies.Server``:

    instruction = open_unit(server, task, round, classes)       # None: the unit asks the clients nothing
    reply = client.client_step(model, images, indices,          # any process, same result
                               instruction, config, client_id)
    server.receive(reply.message)  # for each participant, in increasing client id (float sums are ordered)
    close_unit(server, round)                                   # the merge; new state

Message keys (all tensors): "A/<layer>", "B/<layer>" (factors), "head/weight", "head/bias", "gram/<layer>" and
"gram/head" (Grams after shrinkage, a vector when diagonal), "BP/<layer>" and "P/<layer>" (a pre-reduced
B-round: B_k P_k and P_k = A G_k Aᵀ instead of B_k and G_k), "num_samples"; in instructions also
"task<t>/A/<layer>", "task<t>/B/<layer>" (the finished tasks' adapters).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor

from .config import SEED_PARTICIPATION, RunConfig, derive_seed

FIT, TASK_GRAMS = "fit", "task_grams"  # Instruction.phase: a training round; the Grams at a task's end
HEAD = "head"  # the classification head's name among the Gram layers
HEAD_WEIGHT, HEAD_BIAS = f"{HEAD}/weight", f"{HEAD}/bias"
NUM_SAMPLES = "num_samples"
GRAM_KINDS = ("gram", "BP", "P")  # key prefixes of the Gram-derived tensors of a reply

Unit = tuple[int, int | None]  # (task, round); round None: the task end


def factor_key(factor: str, layer: str) -> str:
    """ "A/<layer>" or "B/<layer>"."""
    return f"{factor}/{layer}"


def gram_key(layer: str) -> str:
    return f"gram/{layer}"


def projection_keys(layer: str) -> tuple[str, str]:
    """The keys of a pre-reduced B-round's B_k P_k and P_k."""
    return f"BP/{layer}", f"P/{layer}"


def task_factor_key(task: int, factor: str, layer: str) -> str:
    """A finished task's factor, as instructions carry it."""
    return f"task{task}/{factor}/{layer}"


def scaled_b(config: RunConfig, b: Tensor) -> Tensor:
    """s·B, the factor that carries the LoRA scaling s = ``config.lora_scaling`` (the one source of s)."""
    return config.lora_scaling * b


def delta_weight(config: RunConfig, b: Tensor, a: Tensor) -> Tensor:
    """ΔW = s·B A of one layer (as PEFT's get_delta_weight): every strategy and the client form it here, so the
    client's rebuilt sum of the finished tasks' updates is the server's to the bit."""
    return scaled_b(config, b) @ a


def units(config: RunConfig, n_tasks: int) -> list[Unit]:
    """(task, round) for every round, (task, None) for every task end."""
    return [(t, r) for t in range(n_tasks) for r in [*range(config.num_comm_rounds), None]]


def participants(config: RunConfig, task: int) -> list[int]:
    """The clients taking part in a task, drawn once per task as the authors (sorted ids)."""
    rng = np.random.default_rng(derive_seed(config.seed, SEED_PARTICIPATION, task))
    return sorted(rng.permutation(config.num_clients)[: int(config.num_clients * config.participation_rate)].tolist())


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


@dataclass(frozen=True)
class Layout:
    """What a client's reply to an instruction holds, besides "num_samples" (``layout``).

    factors: the factors sent per layer ("", "A", "B" or "AB"); head: the head's weight and bias;
    head_gram: the head's Gram (always full); layer_grams: each layer's Gram G_k; projections: each layer's
    (B_k P_k, P_k) in place of B_k and G_k."""

    factors: str
    head: bool
    head_gram: bool
    layer_grams: bool
    projections: bool


def layout(instruction: Instruction) -> Layout:
    """The one statement of what a reply holds: the client builds its message from it, ``message_shapes``
    checks replies against it and the server reads the projections or the Grams as it says."""
    fit = instruction.phase == FIT
    projections = instruction.grams and instruction.prereduce and instruction.train == "B"
    return Layout(
        factors=instruction.train if fit and not projections else "",
        head=fit,
        head_gram=fit and instruction.grams,
        layer_grams=instruction.grams and not projections,
        projections=projections,
    )


def message_shapes(
    instruction: Instruction,
    config: RunConfig,
    layer_shapes: Mapping[str, tuple[int, int]],
    head_shape: tuple[int, int],
) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor a client sends for this instruction, by message key (without "num_samples"):
    what a server of another runtime checks replies against."""
    what, r, (classes, features) = layout(instruction), config.r, head_shape
    shapes: dict[str, tuple[int, ...]] = {}
    for factor in what.factors:
        for name, (out_features, in_features) in layer_shapes.items():
            shapes[factor_key(factor, name)] = (r, in_features) if factor == "A" else (out_features, r)
    if what.head:
        shapes |= {HEAD_WEIGHT: (classes, features), HEAD_BIAS: (classes,)}
    if what.head_gram:
        shapes[gram_key(HEAD)] = (features, features)
    for name, (out_features, in_features) in layer_shapes.items():
        if what.projections:
            weighted, projection = projection_keys(name)
            shapes |= {weighted: (out_features, r), projection: (r, r)}
        elif what.layer_grams:
            shapes[gram_key(name)] = (in_features,) if config.backbone_alpha == 0 else (in_features, in_features)
    return shapes


def open_unit(server, task: int, round: int | None, classes: tuple[int, int]) -> Instruction | None:
    """Opens one unit on ``server`` (a ``strategies.Server``): a task's first round also starts the task; round
    None is the task end. Returns the instruction for the participants, or None when the unit asks nothing."""
    if round == 0:
        server.start_task(task)
    return server.open_task_end(classes) if round is None else server.open_round(round, classes)


def close_unit(server, round: int | None) -> None:
    """Closes the unit ``open_unit`` opened: the round's merge, or (round None) the task's end."""
    if round is None:
        server.close_task()
    else:
        server.close()
