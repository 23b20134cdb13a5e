"""Share Gram collection and server work across processes: all-reduce the running sums with torch.distributed.

Every quantity a LoRM merge needs is a sum over clients (DESIGN.md §3), so processes that each ran part of
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

from collections.abc import Callable, Hashable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from .gram import GramCollector
from .merge import AdapterMerger, BStepMerger, RegMeanMerger

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

    ``config`` must be equal on every process; ``content`` (None on a process with nothing local) must be
    equal on the others, and is returned. Tensors present locally are reduced in place. Names are reduced
    in sorted order, so the processes' dict orders do not matter.
    """
    layout = {key: (tuple(t.shape), t.dtype) for key, t in local.items()}
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (config, content if local else None, layout), group=group)

    for rank, (their_config, _, _) in enumerate(gathered):
        if their_config != config:
            raise ValueError(f"{what}: process {rank} has {their_config}, process 0 has {gathered[0][0]}")
    contents = {rank: c for rank, (_, c, their_layout) in enumerate(gathered) if their_layout}
    if len(set(contents.values())) > 1:
        raise ValueError(f"{what}: processes disagree: " + ", ".join(f"process {r} has {c}" for r, c in contents.items()))
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


def _regmean_parts(merger: RegMeanMerger, device) -> tuple[dict[_Key, Tensor], Hashable, Callable]:
    """(local tensors, content, load back) of a RegMeanMerger, through its public state_dict."""
    state = merger.state_dict()
    local = {("sums", key): t for key, t in state["sums"].items()}
    if local:
        local[("num_clients",)] = torch.tensor(merger.num_clients, dtype=torch.int64, device=device)

    def load(summed: Mapping[_Key, Tensor], uses_lefts) -> None:
        sums = {key[1]: t for key, t in summed.items() if key[0] == "sums"}
        if sums:  # no process had a client: nothing to load
            count = int(summed[("num_clients",)].item())
            merger.load_state_dict({"sums": sums, "num_clients": count, "uses_lefts": uses_lefts})

    return local, state["uses_lefts"], load


def all_reduce_merger_(merger: RegMeanMerger | AdapterMerger | BStepMerger, group=None, *, device=None) -> None:
    """Sum a merger's running sums and client count over the processes of ``group``, in place.

    RegMeanMerger and AStepMerger (their Gram and weighted sums), AdapterMerger (also the objective
    constants), BStepMerger (the projected sums). Shared factors (``shared_b``, ``shared_a``) must be the
    same on every process. ``device`` is where a process without clients creates its zeros (default: the
    current CUDA device under NCCL, else the CPU).
    """
    cpu_or_cuda = _collective_device(group, device)
    if isinstance(merger, AdapterMerger):
        # Until AdapterMerger has a state_dict of its own: its sums are the RegMeanMerger at ._sums and its
        # objective constants are ._constants.
        local, content, load_sums = _regmean_parts(merger._sums, cpu_or_cuda)
        local.update({("constant", name): c for name, c in merger._constants.items()})
        config = ("AdapterMerger", merger.rank, merger.track_objective)

        def load(summed, uses_lefts):
            load_sums(summed, uses_lefts)
            merger._constants.update({key[1]: t for key, t in summed.items() if key[0] == "constant"})

    elif isinstance(merger, BStepMerger):
        # BStepMerger has no state_dict yet either: its sums are the _SolveSums at ._sums.
        local = {("sums", key): t for key, t in merger._sums.state_dict().items()}
        if local:
            local[("num_clients",)] = torch.tensor(merger.num_clients, dtype=torch.int64, device=cpu_or_cuda)
        content = None
        config = ("BStepMerger", tuple((n, tuple(a.shape)) for n, a in sorted(merger.shared_a.items())))

        def load(summed, _):
            sums = {key[1]: t for key, t in summed.items() if key[0] == "sums"}
            if sums:
                merger._sums.load_state_dict(sums, merger._device)
                merger.num_clients = int(summed[("num_clients",)].item())

    elif isinstance(merger, RegMeanMerger):
        local, content, load = _regmean_parts(merger, cpu_or_cuda)
        config = (type(merger).__name__,)
    else:
        raise TypeError(f"all_reduce_merger_ takes a RegMeanMerger, AStepMerger, AdapterMerger or BStepMerger, "
                        f"got {type(merger).__name__}")
    summed, agreed_content = _all_reduce_sums(
        local, what=f"all_reduce_merger_({type(merger).__name__})", config=config, content=content, group=group,
        device=cpu_or_cuda,
    )
    load(summed, agreed_content)
