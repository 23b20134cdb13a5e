"""What travels in each Flower Message: the records of ``strategy.LoRAMergeStrategy`` (any LoRA model) and of the
FCIL protocol (``lorm_ext.fcil.protocol``), which share the reply records.

Any LoRA model (``LoRAMergeStrategy``): the server sends "arrays" (the merged adapter, "B/<module>" and
"A/<module>"; ``read_adapter``) and "config"; a node replies with ``lora_reply``: "arrays" (its B_k, A_k),
"grams" ("gram/<module>") and "metrics" ("num-examples").

FCIL instruction (server → one client), a RecordDict:
    "config"  ConfigRecord: the ``Instruction``'s scalars, "client-id" (the FCIL client this node plays: its
              data shard and its seeds) and "run-config" (the ``RunConfig`` as JSON, so a client needs
              nothing but its data)
    "arrays"  ArrayRecord: the instruction's tensors (the factors and head to start from, and what the Grams
              are taken through: see ``Instruction``)
FCIL reply (client → server):
    "arrays"  ArrayRecord: the trained factor(s) and the head (training rounds only)
    "grams"   ArrayRecord: "gram/<layer>" and "gram/head", or a pre-reduced B-round's "BP/<layer>", "P/<layer>"
    "metrics" MetricRecord: "num-examples", "train-seconds", "gram-seconds"
Training rounds are Flower "train" messages; the end-of-task Gram collection is the custom "query.task_grams".
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from numbers import Real

import torch
from flwr.app import ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict
from torch import Tensor

from ..fcil.client import ClientReply
from ..fcil.config import RunConfig
from ..fcil.protocol import FIT, GRAM_KINDS, HEAD, NUM_SAMPLES, TASK_GRAMS, Instruction, factor_key, gram_key
from ..validation import check_gram, check_matrix, check_values

MESSAGE_TYPES = {FIT: MessageType.TRAIN, TASK_GRAMS: f"{MessageType.QUERY}.{TASK_GRAMS}"}
_SCALARS = [f.name for f in dataclasses.fields(Instruction) if f.name != "tensors"]


def instruction_records(instruction: Instruction, config: RunConfig) -> tuple[ArrayRecord, ConfigRecord]:
    """The tensors and the scalars (with the run configuration) that every selected client gets."""
    scalars = {name: getattr(instruction, name) for name in _SCALARS}
    scalars["run-config"] = json.dumps(config.to_json())
    return ArrayRecord(dict(instruction.tensors)), ConfigRecord(scalars)


def instruction_content(arrays: ArrayRecord, config: ConfigRecord, client_id: int) -> RecordDict:
    return RecordDict({"arrays": arrays, "config": ConfigRecord(dict(config) | {"client-id": client_id})})


def read_instruction(content: RecordDict) -> tuple[Instruction, RunConfig, int]:
    """(instruction, run configuration, client id) of a received instruction."""
    scalars = content["config"]
    instruction = Instruction(
        **{name: scalars[name] for name in _SCALARS}, tensors=dict(content["arrays"].to_torch_state_dict())
    )
    return instruction, RunConfig.from_json(json.loads(scalars["run-config"])), int(scalars["client-id"])


def reply_content(reply: ClientReply) -> RecordDict:
    message = dict(reply.message)
    metrics = MetricRecord(
        {
            "num-examples": int(message.pop(NUM_SAMPLES)),
            "train-seconds": reply.seconds["train"],
            "gram-seconds": reply.seconds["gram"],
        }
    )
    grams = {k: v for k, v in message.items() if k.partition("/")[0] in GRAM_KINDS}
    records = {"grams": ArrayRecord(grams), "metrics": metrics}
    trained = {k: v for k, v in message.items() if k not in grams}
    if trained:
        records["arrays"] = ArrayRecord(trained)
    return RecordDict(records)


def _scalings(scaling: float | Mapping[str, float], modules) -> dict[str, float]:
    return {m: float(scaling if isinstance(scaling, Real) else scaling[m]) for m in modules}


def lora_reply(
    factors: Mapping[str, tuple[Tensor, Tensor]],
    grams: Mapping[str, Tensor],
    num_examples: int,
    *,
    scaling: float | Mapping[str, float] = 1.0,
) -> RecordDict:
    """A node's reply to ``LoRAMergeStrategy``: per module its LoRA factors (B_k, A_k) and the Gram of the
    module's inputs (``gram.GramCollector``), and the number of examples it trained on. ``scaling``: the s of
    the node's ΔW = s·B A (a number, or one per module; PEFT's ``layer.scaling[adapter]``), folded into B."""
    if set(grams) != set(factors):
        raise ValueError(f"lora_reply: factors are for {sorted(factors)} but grams for {sorted(grams)}")
    s = _scalings(scaling, factors)
    arrays = {}
    for module, (b, a) in factors.items():
        arrays |= {factor_key("B", module): (s[module] * b).detach(), factor_key("A", module): a.detach()}
    return RecordDict(
        {
            "arrays": ArrayRecord(arrays),
            "grams": ArrayRecord({gram_key(m): g.detach() for m, g in grams.items()}),
            "metrics": MetricRecord({"num-examples": int(num_examples)}),
        }
    )


def read_adapter(
    arrays: ArrayRecord, modules, *, scaling: float | Mapping[str, float] = 1.0
) -> dict[str, tuple[Tensor, Tensor]]:
    """The merged adapter a ``LoRAMergeStrategy`` sent (its message's "arrays"), {module: (B, A)} with B divided
    by ``scaling`` (the node's s, as in ``lora_reply``): what to load into the node's LoRA model; {} when the
    server sent none (round 1 without an initial adapter)."""
    tensors = arrays.to_torch_state_dict()
    if not tensors:
        return {}
    s = _scalings(scaling, modules)
    return {m: (tensors[factor_key("B", m)] / s[m], tensors[factor_key("A", m)]) for m in modules}


def _decoded(what: str, decode: Callable[[], Tensor]) -> Tensor:
    """decode() of a value a client sent, or a ValueError naming it. The decoders (NumPy's .npy reader, torch's
    conversions) raise many kinds of error on bytes they cannot read (ValueError, TypeError, EOFError,
    zipfile.BadZipFile, tokenize.TokenError, ...): all of them mean the same here, a malformed reply."""
    try:
        return decode()
    except Exception as error:
        detail = str(error).partition("\n")[0]
        raise ValueError(f"{what} cannot be read as a tensor ({type(error).__name__}: {detail})") from error


def read_reply(content: RecordDict) -> dict[str, Tensor]:
    """The client's message as ``Server.receive`` takes it; missing records read as empty (``check_message``
    then names what is missing). A ValueError names an array that is not a readable tensor (corrupt bytes,
    a dtype torch has no tensor for, ...) or a key sent in both records."""
    message: dict[str, Tensor] = {}
    for name in ("arrays", "grams"):
        for key, array in content.array_records.get(name, ArrayRecord()).items():
            if key in message:
                raise ValueError(f"{key!r} is in both the 'arrays' and the 'grams' record")
            message[key] = _decoded(f"{key!r} of the {name!r} record", lambda: torch.from_numpy(array.numpy()))
    metrics = content.metric_records.get("metrics", MetricRecord())
    if "num-examples" in metrics:
        samples = metrics["num-examples"]
        message[NUM_SAMPLES] = _decoded(f"num-examples {samples!r}", lambda: torch.tensor(samples))
    return message


def reply_seconds(content: RecordDict) -> dict[str, float]:
    """ "train-seconds" and "gram-seconds" of a reply's metrics (0 when absent), for information only; a
    ValueError unless each is a finite non-negative number."""
    metrics = content.metric_records.get("metrics", MetricRecord())
    seconds = {key: metrics.get(key, 0.0) for key in ("train-seconds", "gram-seconds")}
    for key, value in seconds.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{key} must be a finite non-negative number, got {value!r}")
    return seconds


def check_message(message: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]]) -> None:
    """A ValueError naming the first problem: missing or unexpected keys, no sample count, a shape, a non-finite
    value, a Gram that is not one (asymmetric, negative diagonal)."""
    missing, extra = sorted(set(expected) - set(message)), sorted(set(message) - set(expected) - {"num_samples"})
    if missing or extra:
        raise ValueError("; ".join([f"missing {missing}"] * bool(missing) + [f"unexpected {extra}"] * bool(extra)))
    samples = message.get("num_samples")
    if samples is None or samples.dtype.is_floating_point or samples.numel() != 1 or int(samples) < 1:
        raise ValueError(f"num-examples must be a positive integer, got {samples}")
    grams, matrices = {}, []  # checked for shape first, then all values in one pass (check_values)
    for key, shape in expected.items():
        kind, _, name = key.partition("/")
        if kind in ("gram", "P"):
            check_gram(name, message[key], width=shape[0], diagonal=len(shape) == 1, values=False)
            grams[name] = message[key]  # a layer sends its Gram or its P (pre-reduced), never both
        else:
            layer, what = (HEAD, key) if kind == HEAD else (name, kind)
            check_matrix(layer, what, message[key], shape, values=False)
            matrices.append((layer, what, message[key]))
    check_values(grams, matrices)
