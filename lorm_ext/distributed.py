"""Share Gram collection and server work across processes: all-reduce the running sums with torch.distributed.

Every quantity a LoRM merge needs is a sum over clients, so processes that each ran part of
the data through a ``GramCollector``, or each added part of the clients to a merger, hold partial sums; one
``all_reduce_grams_`` / ``all_reduce_merger_`` call leaves every process with the sums over all of them,
exactly as if one process had seen everything (up to the order of floating-point additions). Then any
process can ``merge()``. A process may have no data or no clients at all: it contributes zeros.

Call once, after every process has finished adding: a second call would add the totals again. Every process
of the group must call, with the same kind of object (same layers, same rank, same shared factors): layer
names, shapes and dtypes are gathered first and any disagreement raises the same ValueError everywhere, so
a bad process cannot leave the others waiting. See docs/distributed.md.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from .gram import GramCollector
from .merge import AdapterMerger, StreamingMerger

_Key = tuple[str, ...]


def _collective_device(group, device) -> torch.device:
    """Where a process creates the zeros and counters it contributes: NCCL reduces only CUDA tensors."""
    if device is not None:
        return torch.device(device)
    if dist.get_backend(group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce_sums(
    local: Mapping[_Key, Tensor],
    *,
    what: str,
    config: Hashable,
    content: Hashable = None,
    group=None,
    device=None,
) -> tuple[dict[_Key, Tensor], Hashable]:
    """Sums named tensors over the processes of ``group``; a process lacking a name contributes zeros.

    ``config`` must be equal on every process (else a ValueError names the first process whose config differs
    from process 0's, on every process alike); ``content`` (None on a process with nothing local) must be
    equal on the others, and is returned. Tensors present locally are reduced in place. Names are reduced
    in sorted order, so the processes' dict orders do not matter.
    """
    layout = {key: (tuple(t.shape), t.dtype) for key, t in local.items()}
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (config, content if local else None, layout), group=group)

    first_config = gathered[0][0]
    for rank, (their_config, _, _) in enumerate(gathered):
        if their_config != first_config:
            raise ValueError(f"{what}: process {rank} has {their_config}, process 0 has {first_config}")
    contents = {rank: c for rank, (_, c, their_layout) in enumerate(gathered) if their_layout}
    if len(set(contents.values())) > 1:
        raise ValueError(
            f"{what}: processes disagree: " + ", ".join(f"process {r} has {c}" for r, c in contents.items())
        )
    total_layout: dict[_Key, tuple[int, tuple, torch.dtype]] = {}
    for rank, (_, _, their_layout) in enumerate(gathered):
        for key, spec in sorted(their_layout.items()):
            first_rank, *first_spec = total_layout.setdefault(key, (rank, *spec))
            if tuple(first_spec) != spec:
                raise ValueError(
                    f"{what}: {'.'.join(key)} is {spec[0]} {spec[1]} on process {rank} but {first_spec[0]} "
                    f"{first_spec[1]} on process {first_rank}"
                )
    device = _collective_device(group, device)
    summed = {}
    for key in sorted(total_layout):
        _, shape, dtype = total_layout[key]
        tensor = local[key] if key in local else torch.zeros(shape, dtype=dtype, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        summed[key] = tensor
    return summed, next(iter(contents.values()), None)


def all_reduce_grams_(collector: GramCollector, group=None, *, device=None) -> None:
    """Sum a GramCollector's Grams and token counts over the processes of ``group``, in place.

    Each process collects over its share of the data; afterwards every process's ``collector.grams`` and
    ``collector.num_tokens`` are those of all the data. Layers no input reached on a process count as zero.
    """
    local: dict[_Key, Tensor] = {("gram", name): gram for name, gram in collector.grams.items()}
    for name, gram in collector.grams.items():
        local[("tokens", name)] = torch.tensor(collector.num_tokens[name], dtype=torch.int64, device=gram.device)
    config = ("GramCollector", tuple(sorted(collector.diagonal.items())), collector.dtype)
    summed, _ = _all_reduce_sums(local, what="all_reduce_grams_", config=config, group=group, device=device)
    for (kind, name), tensor in summed.items():
        if kind == "gram":
            collector.grams[name] = tensor
        else:
            collector.num_tokens[name] = int(tensor.item())


def _flatten(state: Mapping, prefix: _Key = ()) -> dict[_Key, object]:
    leaves = {}
    for key, value in state.items():
        path = (*prefix, str(key))
        leaves.update(_flatten(value, path) if isinstance(value, Mapping) else {path: value})
    return leaves


def _unflatten(leaves: Mapping[_Key, object]) -> dict:
    state: dict = {}
    for path, value in leaves.items():
        node = state
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return state


def all_reduce_merger_(merger: StreamingMerger | AdapterMerger, group=None, *, device=None) -> None:
    """Sum a merger's running sums and client count over the processes of ``group``, in place.

    RegMeanMerger and AStepMerger (Gram and weighted sums), BStepMerger (projected sums), AdapterMerger
    (also the objective constants, so ``objective`` stays exact). Works on the merger's public protocol: its
    ``merge_key`` (kind, and shapes of the shared factors or the rank) must be equal on every process; in its
    state_dict every tensor and ``num_clients`` is summed, every other entry (``uses_lefts``) must agree. Shared
    factors (``shared_b``, ``shared_a``) must also hold the same values on every process (not checked). ``device`` is where a process without
    clients creates its zeros (default: the current CUDA device under NCCL, else the CPU).
    """
    if not isinstance(merger, (StreamingMerger, AdapterMerger)):
        raise TypeError(
            f"all_reduce_merger_ takes a RegMeanMerger, AStepMerger, BStepMerger or AdapterMerger, "
            f"got {type(merger).__name__}"
        )
    device = _collective_device(group, device)
    leaves = _flatten(merger.state_dict())
    local = {path: value for path, value in leaves.items() if isinstance(value, Tensor)}
    has_clients = bool(local)
    counts = [path for path in leaves if path[-1] == "num_clients"]
    if has_clients:
        local.update({path: torch.tensor(leaves[path], dtype=torch.int64, device=device) for path in counts})
    others = tuple(sorted((path, v) for path, v in leaves.items() if path not in local and path not in counts))
    summed, agreed = _all_reduce_sums(
        local,
        what=f"all_reduce_merger_({type(merger).__name__})",
        config=merger.merge_key,
        content=others,
        group=group,
        device=device,
    )
    if not summed:  # no process had a client: nothing to add
        return
    state = {path: int(t.item()) if path in counts else t for path, t in summed.items()} | dict(agreed)
    merger.load_state_dict(_unflatten(state))
