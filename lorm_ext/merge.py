"""Streaming LoRM mergers: clients arrive one at a time as dicts keyed by layer name, each client's tensors are
folded into running sums by the fused ops, and one batched solve per layer shape finishes the merge.
Memory does not grow with the number of clients. ``lorm_ext.reference`` states what every merge computes.

Every merge here solves, per layer, numerator · denominator⁺: the numerator (m × n) is the sum of what the
clients send times their Grams (Σ [L_k] F_k G_k, or Σ B_k P_k), the denominator (n × n, or its diagonal) the
sum of the Grams (Σ G_k, or Σ P_k). Those two names are used for them throughout, always in that order; the
fused ops call them ``weighted_sums`` and ``gram_sums`` / ``projection_sums``.

The streaming mergers (``StreamingMerger``: RegMeanMerger, AStepMerger, BStepMerger) share a small public
protocol: ``sum_groups`` (the sums, stacked by shape), ``dtype``, ``rcond``, ``merge_key`` (what the merger
merges: equal keys mean the sums of two mergers may be added), ``state_dict`` / ``load_state_dict``.

- ``RegMeanMerger``: W = (Σ_k [L_k] F_k G_k)(Σ_k G_k)⁺. RegMean (F_k = W_k), the A-step with B shared
  (F_k = A_k), the cross-task merge (L_t = B_t, F_t = A_t).
- ``AStepMerger``: the A-step, also with per-client B_k: A = (BᵀB)⁺ Bᵀ (Σ_k B_k A_k G_k) G⁺.
- ``BStepMerger``: the B-step with A shared: B = (Σ_k B_k P_k)(Σ_k P_k)⁺, P_k = A G_k Aᵀ; clients may send
  (B_k P_k, P_k) instead of (B_k, G_k) (``project_client``).
- ``AdapterMerger``: adapters of any ranks into one rank-r adapter, by alternating steps or in closed form.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import ops
from .reference import DEFAULT_RCOND
from .validation import LayerError, check_gram, check_layer_names, check_matrix, check_rank_fits, check_values


@dataclass
class SumGroup:
    """Same-shape layers' sums stacked, so that one batched solve finishes them all."""

    names: list[str] = field(default_factory=list)
    numerators: Tensor | None = None  # (L, m, n)
    denominators: Tensor | None = None  # (L, n, n), or (L, n) for diagonal Grams


class _SolveSums:
    """Per layer a numerator R (m × n) and a PSD denominator D (n × n, or its diagonal); solve() gives R D⁺."""

    def __init__(self, dtype: torch.dtype, rcond: float):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"accumulators must be float32 or float64, got {dtype}")
        self.dtype, self.rcond = dtype, rcond
        self.groups: dict[tuple, SumGroup] = {}
        self.slots: dict[str, tuple[tuple, int]] = {}
        self._views: dict[str, tuple[Tensor, Tensor]] = {}

    def allocate(self, shapes: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]], device) -> None:
        """Zero sums for {layer: (numerator shape, denominator shape)}."""
        for name, (numerator_shape, denominator_shape) in shapes.items():
            group = self.groups.setdefault((numerator_shape, denominator_shape), SumGroup())
            self.slots[name] = ((numerator_shape, denominator_shape), len(group.names))
            group.names.append(name)
        for (numerator_shape, denominator_shape), group in self.groups.items():
            group.numerators = torch.zeros((len(group.names), *numerator_shape), dtype=self.dtype, device=device)
            group.denominators = torch.zeros((len(group.names), *denominator_shape), dtype=self.dtype, device=device)
        # made once: indexing the stacked storage per layer and client costs as much as a small layer's merge
        self._views = {
            n: (self.groups[k].numerators[i], self.groups[k].denominators[i]) for n, (k, i) in self.slots.items()
        }

    @property
    def allocated(self) -> bool:
        return bool(self.slots)

    @property
    def device(self) -> torch.device:
        return next(iter(self.groups.values())).numerators.device

    def shapes(self, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return self.slots[name][0]

    def views(self, names) -> tuple[list[Tensor], list[Tensor]]:
        """(numerators, denominators) of the named layers: views into the stacked storage."""
        return [self._views[n][0] for n in names], [self._views[n][1] for n in names]

    def solve(self) -> dict[str, Tensor]:
        out = {}
        for group in self.groups.values():
            denominators = group.denominators
            # diagonal Grams as (L, 1, n): never ambiguous with one full Gram, whatever L and n are
            if denominators.dim() == 2:
                denominators = denominators.unsqueeze(-2)
            solved = ops.psd_right_solve(group.numerators, denominators, self.rcond)
            out.update(zip(group.names, solved.unbind(0)))
        return out

    def state_dict(self) -> dict[str, Tensor]:
        out = {}
        for name, (numerator, denominator) in self._views.items():
            out[f"{name}.numerator"], out[f"{name}.denominator"] = numerator, denominator
        return out

    def load_state_dict(
        self,
        state: Mapping[str, Tensor],
        device=None,
        *,
        values: bool = True,
        expected: Mapping[str, tuple[tuple[int | None, int | None], tuple[int, ...] | None]] | None = None,
    ) -> None:
        """Replaces the sums with ``state_dict()`` output, checked whole before anything changes (``_check_state``).
        An empty state (no client yet) leaves the sums unallocated."""
        names = self._check_state(state, values, expected)
        if not names:
            self.groups, self.slots, self._views = {}, {}, {}
            return
        if not self.allocated:
            self.allocate(
                {n: (tuple(state[f"{n}.numerator"].shape), tuple(state[f"{n}.denominator"].shape)) for n in names},
                device if device is not None else state[f"{names[0]}.numerator"].device,
            )
        numerators, denominators = self.views(names)
        for name, numerator, denominator in zip(names, numerators, denominators):
            numerator.copy_(state[f"{name}.numerator"])
            denominator.copy_(state[f"{name}.denominator"])

    def _check_state(self, state, values: bool, expected) -> list[str]:
        """The layer names of a valid state; else a ValueError naming the first problem: keys not in pairs
        ("<layer>.numerator", "<layer>.denominator"), other layers than the allocated ones (or than ``expected``'s),
        a tensor not of the sums' dtype, shapes other than the allocated ones, or than an (m, n) numerator with
        an (n, n) or (n,) denominator matching ``expected`` ({layer: (numerator shape, denominator shape or
        None)}, None matching any size; no broadcasting), and unless values=False a NaN or Inf."""
        if not isinstance(state, Mapping):
            raise ValueError(f"load_state_dict: the sums must be a dict of tensors, got {type(state).__name__}")
        parts = (".numerator", ".denominator")
        odd = sorted(str(k) for k in state if not isinstance(k, str) or not k.endswith(parts))
        if odd:
            raise ValueError(f"load_state_dict: the sums have keys {odd} that end in neither {' nor '.join(parts)}")
        names = list(dict.fromkeys(k.rpartition(".")[0] for k in state))
        unpaired = sorted(f"{n}{part}" for n in names for part in parts if f"{n}{part}" not in state)
        if unpaired:
            raise ValueError(f"load_state_dict: the sums lack {unpaired} (a layer has a numerator and a denominator)")
        if self.allocated:
            expected = {n: self.shapes(n) for n in self.slots}
        if expected is not None and names:
            check_layer_names(expected, dict.fromkeys(names), "load_state_dict")
        try:
            for name in names:
                numerator, denominator = state[f"{name}.numerator"], state[f"{name}.denominator"]
                for what, t in (("numerator", numerator), ("denominator", denominator)):
                    if not isinstance(t, Tensor) or t.dtype != self.dtype:
                        got = t.dtype if isinstance(t, Tensor) else type(t).__name__
                        raise LayerError(name, f"{what} must be a {self.dtype} tensor like the sums, got {got}")
                numerator_shape, denominator_shape = expected[name] if expected is not None else ((None, None), None)
                if denominator_shape is None:  # any (n, n) or its diagonal (n,), n the numerator's width
                    shape = tuple(denominator.shape)
                    if len(shape) != 1 and (len(shape) != 2 or shape[0] != shape[1]):
                        raise LayerError(name, f"denominator must be (n, n) or a diagonal (n,), got {shape}")
                    denominator_shape = (numerator_shape[1],) * denominator.dim()
                check_matrix(name, "denominator", denominator, denominator_shape, values=False)
                check_matrix(name, "numerator", numerator, (numerator_shape[0], denominator.shape[0]), values=False)
            if values:
                tensors = [(n, what, state[f"{n}.{what}"]) for n in names for what in ("numerator", "denominator")]
                check_values({}, tensors)
        except LayerError as error:
            raise ValueError(f"load_state_dict: {error}") from None
        return names


def _first_device(tensors: Mapping[str, Tensor], device):
    return torch.device(device) if device is not None else next(iter(tensors.values())).device


def _shapes(tensors: Mapping[str, Tensor]) -> tuple:
    return tuple((name, tuple(t.shape)) for name, t in sorted(tensors.items()))


def _layer_names(what: str, tensors: Mapping[str, Tensor]) -> list[str]:
    if not isinstance(tensors, Mapping) or len(tensors) == 0:
        raise ValueError(f"{what}: expected a non-empty dict of tensors keyed by layer name")
    return list(tensors)


# How the native ops' argument checks (csrc/checks.cpp) begin their messages; they run before any write.
_NATIVE_CHECK_PREFIX = "lorm_ext::"


def _layer_keys(tensors: tuple) -> tuple | None:
    """The layer names in order of each of a client's dicts (None for one not sent); None when something is not a
    dict (the checks then say what is wrong)."""
    keys = []
    for mapping in tensors:
        if mapping is not None and not isinstance(mapping, dict) and not isinstance(mapping, Mapping):
            return None  # (the ABC check only for other mappings: it costs as much as the rest)
        keys.append(None if mapping is None else tuple(mapping))
    return tuple(keys)


def _structure(tensors: tuple) -> tuple | None:
    """What a client's structure checks look at, for each of its dicts (None for one not sent): layer names in
    order, and per tensor its type, dtype, shape and device. None when something is not a dict of tensors (the
    checks then say what is wrong)."""
    out = []
    for mapping in tensors:
        if mapping is None:
            out.append(None)
            continue
        if not isinstance(mapping, Mapping):
            return None
        try:
            out.append(tuple((name, type(t), t.dtype, t.shape, t.device) for name, t in mapping.items()))
        except AttributeError:
            return None
    return tuple(out)


class StreamingMerger:
    """Running sums per layer, a client count, and the one batched solve that finishes the merge.

    The protocol other code may rely on (AdapterMerger, ``distributed.all_reduce_merger_``): ``sum_groups``,
    ``dtype``, ``rcond``, ``merge_key``, ``state_dict`` / ``load_state_dict``, ``num_clients``, ``layers``."""

    _STATE_KEYS: tuple[str, ...] = ("sums", "num_clients")  # of state_dict()

    def __init__(self, *, dtype=torch.float64, rcond: float = DEFAULT_RCOND, device=None, validate: bool = True):
        self._sums = _SolveSums(dtype, rcond)
        self._device, self.validate = device, validate
        self.num_clients = 0
        self._passed: dict[str, tuple[tuple, list[str]]] = {}  # see _add_checked

    def _add_checked(self, kind: str, tensors: tuple, check, add) -> None:
        """Folds in a client of this kind: ``check()``, the structure checks (layer names, dtypes, shapes), returns
        its layer names, then ``add(names, checked=True)`` checks its values (unless validate=False) and adds it.

        A client that has the layer names, in order, of the last one of its kind that passed ``check()`` goes
        straight to ``add(names, checked=False)``: the fused ops check every shape, dtype and device themselves
        before they write, and only when one refuses does ``check()`` run, to name the layer and the problem (or
        to pass, when the tensors only had to be moved to the sums' device). The Python checks cost a call per
        tensor, more than a small layer's merge. Kinds whose ``add`` is not a fused op are in
        ``_SAME_STRUCTURE_KINDS``: for those the tensors' types, dtypes, shapes and devices must match too."""
        key = _structure(tensors) if kind in self._SAME_STRUCTURE_KINDS else _layer_keys(tensors)
        passed = self._passed.get(kind)
        if key is not None and passed is not None and passed[0] == key:
            try:
                add(passed[1], checked=False)
                return
            except (TypeError, AttributeError):
                pass  # not a tensor where one belongs: check() names it
            except RuntimeError as error:
                if not str(error).startswith(_NATIVE_CHECK_PREFIX):
                    raise  # not an argument check (out of memory, say): the sums may have changed, say so as it is
        names = check()
        add(names, checked=True)
        if key is not None:
            self._passed[kind] = (key, list(names))

    def _inputs(self, tensors: Mapping[str, Tensor], names: list[str], checked: bool) -> list[Tensor]:
        """One tensor per layer in the order of names, for a fused op: moved to the sums' device when the Python
        checks ran, as sent otherwise (the op refuses one on another device; see _add_checked)."""
        if checked:
            device = self._sums.device
            return [tensors[n].to(device) for n in names]
        return [tensors[n] for n in names]

    _SAME_STRUCTURE_KINDS: frozenset[str] = frozenset()

    @property
    def layers(self) -> list[str]:
        return list(self._sums.slots)

    @property
    def dtype(self) -> torch.dtype:
        """Of the sums and the solve."""
        return self._sums.dtype

    @property
    def rcond(self) -> float:
        return self._sums.rcond

    @property
    def device(self) -> torch.device | None:
        """Where the sums live; None before the first client."""
        return self._sums.device if self._sums.allocated else None

    @property
    def sum_groups(self) -> list[SumGroup]:
        """The sums, same-shape layers stacked (the storage itself, not copies); empty before the first client."""
        return list(self._sums.groups.values())

    @property
    def merge_key(self) -> tuple:
        """What this merger merges: its kind and the shapes of what it shares with every client. Two mergers
        whose sums may be added (over processes, say) have equal keys."""
        return (type(self).__name__, self._shared_shapes())

    def _shared_shapes(self) -> tuple:
        """(layer, shape) of the factors the server shares with every client, sorted by layer; none here."""
        return ()

    def merge(self) -> dict[str, Tensor]:
        if self.num_clients == 0:
            raise ValueError(f"{type(self).__name__}: no clients were added, nothing to merge")
        return self._sums.solve()

    def state_dict(self) -> dict:
        """The running sums (views, not copies) and the client count: enough to resume the stream."""
        return {"sums": self._sums.state_dict(), "num_clients": self.num_clients}

    def load_state_dict(self, state: Mapping) -> None:
        """Replaces the state with ``state_dict()`` output. All of it is checked before anything changes — keys,
        client count, layer names, dtypes, exact shapes (no broadcasting) and, unless validate=False, finite
        values — so a ValueError leaves the merger as it was."""
        self._check_state(state)
        self._sums.load_state_dict(state["sums"], self._device, values=self.validate, expected=self._expected_sums())
        self._set_state(state)

    def _check_state(self, state) -> None:
        """The keys and scalars of a state to load (``_SolveSums.load_state_dict`` checks the sums)."""
        if not isinstance(state, Mapping) or set(state) != set(self._STATE_KEYS):
            got = sorted(map(str, state)) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"load_state_dict: expected a dict with the keys {list(self._STATE_KEYS)}, got {got}")
        clients, sums = state["num_clients"], state["sums"]
        if isinstance(clients, bool) or not isinstance(clients, int) or clients < 0:
            raise ValueError(f"load_state_dict: num_clients must be a non-negative integer, got {clients!r}")
        if isinstance(sums, Mapping) and bool(sums) != (clients > 0):
            raise ValueError(f"load_state_dict: num_clients is {clients} but the sums hold {len(sums)} tensors")

    def _expected_sums(self) -> Mapping[str, tuple] | None:
        """What a state loaded before the first client must match (see ``_SolveSums._check_state``)."""
        return None

    def _set_state(self, state: Mapping) -> None:
        self.num_clients = state["num_clients"]
        self._passed = {}  # sums loaded into a merger without clients may have other shapes


class RegMeanMerger(StreamingMerger):
    """Streams clients into Σ_k G_k and Σ_k [L_k] F_k G_k per layer; ``merge()`` = (Σ [L_k] F_k G_k)(Σ G_k)⁺.

    ``add_client(factors, grams, lefts=None)``: F_k (p × n) and G_k (n × n, or a length-n diagonal) per layer,
    optionally L_k (m × p). The first client fixes the layers, shapes and whether lefts are sent; every later
    client must match. Each client is fully validated before any sum changes (``validate=False`` skips the
    value checks — finiteness, symmetry — and keeps the shape checks). Sums and solves are in ``dtype``.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._uses_lefts: bool | None = None

    # How messages name add_client's factors and lefts: (the dict, one layer's tensor). A subclass or a wrapper
    # whose users pass them under other names (AStepMerger's factors_b) names them so.
    _argument_names = {"factors": ("factors", "factor"), "lefts": ("lefts", "left")}

    def _check_client_structure(self, factors, grams, lefts) -> list[str]:
        (factors_arg, factor), (lefts_arg, left) = self._argument_names["factors"], self._argument_names["lefts"]
        names = _layer_names(factors_arg, factors)
        if self._sums.allocated:
            check_layer_names(self._sums.slots, factors, factors_arg)
        check_layer_names(names, grams, "grams")
        if lefts is not None:
            check_layer_names(names, lefts, lefts_arg)
        if self._sums.allocated:
            if (lefts is not None) != self._uses_lefts:
                said = "sent them" if self._uses_lefts else "did not"
                raise ValueError(f"{lefts_arg} must be sent by every client or by none: earlier clients {said}")
        for name in names:
            (rows, width), denominator_shape = self._sums.shapes(name) if self._sums.allocated else ((None, None), None)
            diagonal = None if denominator_shape is None else len(denominator_shape) == 1
            check_gram(name, grams[name], width, diagonal, values=False)
            width = grams[name].shape[0]
            if lefts is None:
                check_matrix(name, factor, factors[name], (rows, width), values=False)
            else:  # the left's columns fix the factor's rows: a mismatch names the factor
                check_matrix(name, left, lefts[name], (rows, None), values=False)
                check_matrix(name, factor, factors[name], (lefts[name].shape[1], width), values=False)
        return names

    def add_client(
        self,
        factors: Mapping[str, Tensor],
        grams: Mapping[str, Tensor],
        lefts: Mapping[str, Tensor] | None = None,
    ) -> None:
        self._add_checked(
            "client",
            (factors, grams, lefts),
            lambda: self._check_client_structure(factors, grams, lefts),
            lambda names, checked: self._add_client(names, factors, grams, lefts, checked),
        )

    def _add_client(self, names: list[str], factors, grams, lefts, checked: bool) -> None:
        if self.validate:
            factor, left = self._argument_names["factors"][1], self._argument_names["lefts"][1]
            matrices = [(n, factor, factors[n]) for n in names]
            matrices += [(n, left, lefts[n]) for n in names] if lefts is not None else []
            check_values({n: grams[n] for n in names}, matrices)
        if not self._sums.allocated:
            rows = {n: (lefts[n] if lefts is not None else factors[n]).shape[0] for n in names}
            shapes = {n: ((rows[n], grams[n].shape[0]), tuple(grams[n].shape)) for n in names}
            self._sums.allocate(shapes, _first_device(grams, self._device))
            self._uses_lefts = lefts is not None
        numerators, denominators = self._sums.views(names)
        ops.gram_weighted_accumulate_(
            denominators,
            numerators,
            self._inputs(grams, names, checked),
            self._inputs(factors, names, checked),
            self._inputs(lefts, names, checked) if lefts is not None else None,
        )
        self.num_clients += 1

    def state_dict(self) -> dict:
        return {**super().state_dict(), "uses_lefts": self._uses_lefts}

    _STATE_KEYS = (*StreamingMerger._STATE_KEYS, "uses_lefts")

    def _check_state(self, state) -> None:
        super()._check_state(state)
        uses_lefts, clients = state["uses_lefts"], state["num_clients"]
        if (uses_lefts is None) != (clients == 0) or not (uses_lefts is None or isinstance(uses_lefts, bool)):
            raise ValueError(
                f"load_state_dict: uses_lefts must be None without clients and True or False with them, got "
                f"{uses_lefts!r} with {clients} clients"
            )

    def _set_state(self, state: Mapping) -> None:
        super()._set_state(state)
        self._uses_lefts = state["uses_lefts"]


def _solve_left(gram: Tensor, rhs: Tensor, rcond: float) -> Tensor:
    """gram⁺ rhs for symmetric PSD gram (batched): the transpose of rhsᵀ gram⁺."""
    return ops.psd_right_solve(rhs.mT, gram, rcond).mT


class AStepMerger(RegMeanMerger):
    """LoRM A-step. Without ``shared_b`` (B shared by all clients): A = (Σ_k A_k G_k) G⁺.

    With the server's ``shared_b`` every client also sends its own B_k (``factors_b``), and
    A = (BᵀB)⁺ Bᵀ (Σ_k B_k A_k G_k) G⁺, the minimiser over A of Σ_k ‖X_k (B A − B_k A_k)ᵀ‖².
    """

    _argument_names = {"factors": ("factors", "factor"), "lefts": ("factors_b", "factors_b")}

    def __init__(self, shared_b: Mapping[str, Tensor] | None = None, **kwargs):
        super().__init__(**kwargs)
        if shared_b is not None:
            for name, b in shared_b.items():
                check_matrix(name, "shared_b", b, (None, None))
        self.shared_b = shared_b

    def _shared_shapes(self) -> tuple:
        return _shapes(self.shared_b or {})

    def add_client(self, factors, grams, factors_b: Mapping[str, Tensor] | None = None) -> None:
        if (factors_b is None) != (self.shared_b is None):
            raise ValueError(
                "per-client B factors go with the general A-step: give AStepMerger(shared_b=...) and pass "
                "factors_b with every client, or neither"
            )
        if factors_b is not None:
            check_layer_names(self.shared_b, factors_b, "factors_b")
            for name, b in factors_b.items():
                check_matrix(name, "factors_b", b, tuple(self.shared_b[name].shape), values=False)
        super().add_client(factors, grams, lefts=factors_b)

    def _check_state(self, state) -> None:
        super()._check_state(state)
        if state["uses_lefts"] not in (None, self.shared_b is not None):
            had, has = ("with", "has no") if state["uses_lefts"] else ("without", "has a")
            raise ValueError(
                f"load_state_dict: the state is of an A-step {had} per-client B factors (factors_b); this merger {has} "
                f"shared_b"
            )

    def _expected_sums(self) -> Mapping[str, tuple] | None:
        if self.shared_b is None:
            return None
        return {n: ((b.shape[0], None), None) for n, b in self.shared_b.items()}  # B_k A_k G_k is out × in

    def merge(self) -> dict[str, Tensor]:
        merged = super().merge()
        if self.shared_b is None:
            return merged
        out = {}
        for name, m in merged.items():
            b = self.shared_b[name].to(m)
            out[name] = _solve_left(b.T @ b, b.T @ m, self._sums.rcond)
        return out


def project_client(
    shared_a: Mapping[str, Tensor], factors_b: Mapping[str, Tensor], grams: Mapping[str, Tensor], dtype=torch.float64
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A client's B-step message pre-reduced: (B_k P_k, P_k) per layer with P_k = A G_k Aᵀ.

    out × r and r × r instead of out × r and in × in; the server only ever needs their sums
    (``BStepMerger.add_projections``), so this also suits secure aggregation.
    """
    names = _layer_names("factors_b", factors_b)
    check_layer_names(names, shared_a, "shared_a")
    check_layer_names(names, grams, "grams")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"project_client: dtype must be torch.float32 or torch.float64, got {dtype}")
    for name in names:  # checked here so that a problem names the layer and the argument, not an op's list entry
        check_gram(name, grams[name], values=False)
        check_matrix(name, "shared_a", shared_a[name], (None, grams[name].shape[0]), values=False)
        check_matrix(name, "factors_b", factors_b[name], (None, shared_a[name].shape[0]), values=False)
    return _projected(shared_a, factors_b, grams, dtype)


def _projected(shared_a, factors_b, grams, dtype) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(B_k P_k, P_k) per layer, P_k = A G_k Aᵀ, of checked inputs: one fused op over every layer."""
    names = list(factors_b)
    device = {n: grams[n].device for n in names}
    rank = {n: shared_a[n].shape[0] for n in names}
    projections = {n: torch.zeros(rank[n], rank[n], dtype=dtype, device=device[n]) for n in names}
    weighted = {n: torch.zeros(factors_b[n].shape[0], rank[n], dtype=dtype, device=device[n]) for n in names}
    ops.projected_accumulate_(
        [projections[n] for n in names],
        [weighted[n] for n in names],
        [grams[n] for n in names],
        [shared_a[n].to(device[n]) for n in names],
        [factors_b[n].to(device[n]) for n in names],
    )
    return weighted, projections


class BStepMerger(StreamingMerger):
    """LoRM B-step with A shared: streams Σ_k P_k and Σ_k B_k P_k (P_k = A G_k Aᵀ, r × r);
    ``merge()`` = (Σ_k B_k P_k)(Σ_k P_k)⁺. Never forms an out × in product.

    ``add_client(factors_b, grams)`` takes B_k and the raw Gram; ``add_projections(weighted, projections)``
    takes a pre-reduced client (``project_client``). Both may be mixed within a round.
    """

    def __init__(
        self,
        shared_a: Mapping[str, Tensor],
        *,
        dtype=torch.float64,
        rcond: float = DEFAULT_RCOND,
        device=None,
        validate: bool = True,
    ):
        names = _layer_names("shared_a", shared_a)
        for name in names:
            check_matrix(name, "shared_a", shared_a[name], (None, None))
        super().__init__(dtype=dtype, rcond=rcond, device=_first_device(shared_a, device), validate=validate)
        self.shared_a = dict(shared_a)
        self._shared_a_as_sums: list[Tensor] | None = None

    def _shared_shapes(self) -> tuple:
        return _shapes(self.shared_a)

    def _check_structure(self, factors_b: Mapping[str, Tensor], what: str) -> list[str]:
        """Names and shapes of the B-shaped inputs (B_k, or B_k P_k) against A and the earlier clients."""
        check_layer_names(self.shared_a, factors_b, what)
        names = list(self.shared_a)
        for name in names:
            rows = self._sums.shapes(name)[0][0] if self._sums.allocated else None
            check_matrix(name, what, factors_b[name], (rows, self.shared_a[name].shape[0]), values=False)
        return names

    def _views_after_checks(self, factors_b: Mapping[str, Tensor], names: list[str]):
        """The sums to add into, allocated by the first client once it has passed every check."""
        if not self._sums.allocated:
            rank = {n: self.shared_a[n].shape[0] for n in names}
            self._sums.allocate(
                {n: ((factors_b[n].shape[0], rank[n]), (rank[n], rank[n])) for n in names}, self._device
            )
        return self._sums.views(names)

    def _expected_sums(self) -> Mapping[str, tuple]:
        rank = {n: a.shape[0] for n, a in self.shared_a.items()}
        return {n: ((None, r), (r, r)) for n, r in rank.items()}  # Σ B_k P_k is out × r, Σ P_k r × r

    def _shared_a_like_sums(self) -> list[Tensor]:
        """A in the sums' dtype and on their device, converted once: the op reads it for every client."""
        if self._shared_a_as_sums is None:
            device, dtype = self._sums.device, self._sums.dtype
            self._shared_a_as_sums = [a.to(device, dtype).contiguous() for a in self.shared_a.values()]
        return self._shared_a_as_sums

    def add_client(self, factors_b: Mapping[str, Tensor], grams: Mapping[str, Tensor]) -> None:
        def check() -> list[str]:
            check_layer_names(self.shared_a, grams, "grams")
            for name, a in self.shared_a.items():
                check_gram(name, grams[name], a.shape[1], values=False)
            return self._check_structure(factors_b, "factor")

        def add(names: list[str], checked: bool) -> None:
            if self.validate:
                check_values(grams, [(n, "factor", factors_b[n]) for n in names])
            numerators, denominators = self._views_after_checks(factors_b, names)
            ops.projected_accumulate_(
                denominators,
                numerators,
                self._inputs(grams, names, checked),
                self._shared_a_like_sums(),
                self._inputs(factors_b, names, checked),
            )
            self.num_clients += 1

        self._add_checked("client", (factors_b, grams), check, add)

    def add_projections(self, weighted: Mapping[str, Tensor], projections: Mapping[str, Tensor]) -> None:
        """Add a pre-reduced client: B_k P_k (out × r) and P_k (r × r) per layer."""

        def check() -> list[str]:
            check_layer_names(self.shared_a, projections, "projections")
            for name, a in self.shared_a.items():
                check_gram(name, projections[name], a.shape[0], diagonal=False, values=False)
            return self._check_structure(weighted, "weighted projection")

        def add(names: list[str], checked: bool) -> None:  # (converted to the sums' device and dtype either way)
            if self.validate:
                check_values(projections, [(n, "weighted projection", weighted[n]) for n in names])
            numerators, denominators = self._views_after_checks(weighted, names)
            device, dtype = self._sums.device, self._sums.dtype
            torch._foreach_add_(denominators, [projections[n].to(device, dtype) for n in names])
            torch._foreach_add_(numerators, [weighted[n].to(device, dtype) for n in names])
            self.num_clients += 1

        self._add_checked("projections", (weighted, projections), check, add)

    _SAME_STRUCTURE_KINDS = frozenset({"projections"})  # torch's foreach add broadcasts and converts any dtype


def _times_gram(m: Tensor, gram: Tensor) -> Tensor:
    """m G, batched, for full (L, n, n) or diagonal (L, n) Grams."""
    return m * gram.unsqueeze(-2) if gram.dim() == m.dim() - 1 else m @ gram


def excess_objective(numerator: Tensor | FactoredNumerator, gram: Tensor, B: Tensor, A: Tensor) -> Tensor:
    """Σ_k ‖X_k (B A − B_k A_k)ᵀ‖² minus its constant c = Σ_k ‖X_k (B_k A_k)ᵀ‖², batched over layers:
    ⟨BᵀB, A G Aᵀ⟩ − 2⟨B, N Aᵀ⟩ with N = Σ_k B_k A_k G_k. Never forms an out × in product."""
    projected = _times_gram(A, gram) @ A.mT
    return ((B.mT @ B) * projected).sum((-2, -1)) - 2 * (B * (numerator @ A.mT)).sum((-2, -1))


# Pivots at or below this fraction of max_j G_jj count as singular to working precision (as psd_right_solve).
_CHOLESKY_PIVOT_TOLERANCE = 1e-12
# Oversampling of the range sketch in _top_singular: more columns than rank(X) keep the sketch well conditioned.
_SKETCH_OVERSAMPLING = 8


@dataclass(frozen=True)
class FactoredNumerator:
    """N = left @ right, batched ((..., m, R) @ (..., R, n)): an adapter merge's N = Σ_k B_k (A_k G_k) kept as
    [B_1 … B_K] and [A_1 G_1; …; A_K G_K] while R = Σ_k r_k is small next to m and n, so that folding an
    adapter in is a copy and the solve works on R-wide matrices (``_top_singular``)."""

    left: Tensor
    right: Tensor

    def __matmul__(self, other: Tensor) -> Tensor:
        return self.left @ (self.right @ other)

    def __getitem__(self, index) -> FactoredNumerator:
        return FactoredNumerator(self.left[index], self.right[index])

    def dim(self) -> int:
        return self.left.dim()

    def dense(self) -> Tensor:
        return self.left @ self.right


@dataclass
class _HouseholderQR:
    """M = Q R (M m × k, m ≥ k) kept as LAPACK's reflectors: Q is applied, never formed (half the work)."""

    reflectors: Tensor
    tau: Tensor

    @classmethod
    def of(cls, m: Tensor) -> _HouseholderQR:
        return cls(*torch.geqrf(m))

    @property
    def r(self) -> Tensor:
        k = self.reflectors.shape[-1]
        return self.reflectors[..., :k, :].triu()

    def q_times(self, x: Tensor) -> Tensor:
        """Q x for x k × c: the reflectors applied to x padded with zero rows to m × c."""
        m, k = self.reflectors.shape[-2:]
        padded = torch.cat([x, x.new_zeros(*x.shape[:-2], m - k, x.shape[-1])], dim=-2)
        return torch.ormqr(self.reflectors, self.tau, padded)


def _top_singular(
    numerator: Tensor | FactoredNumerator, rank: int, rank_bound: int | None, times_w=None, w_times=None
) -> tuple[Tensor, Tensor, Tensor]:
    """The top ``rank`` singular triplets (U, S, Vh) of x = N W (batched m × n; W = I without ``times_w``).

    ``times_w(M)`` = M W and ``w_times(Ω)`` = W Ω. A ``FactoredNumerator`` N = L R (L m × R, R R × n, R below
    m and n) has x = Q_L (R_L R W) with L = Q_L R_L (QR): the SVD of the R-wide (R_L R) W is that of x,
    exactly (``_top_singular_of_wide``). With ``rank_bound`` ≥ rank(N) (an
    adapter merge knows one: rank(Σ_k B_k A_k G_k) ≤ Σ_k r_k) and small next to min(m, n), x = Q Qᵀ x for Q an
    orthonormal basis of N (W Ω), Ω Gaussian n × (bound + oversampling): the SVD of the small (Qᵀ N) W is then
    the SVD of x, exact up to rounding, at O(m n bound) instead of O(m n²) and without ever forming the m × n
    product x. Otherwise x itself is decomposed, through the QR of its longer side.
    """
    times_w = times_w or (lambda m: m)
    if isinstance(numerator, FactoredNumerator) and numerator.left.shape[-1] < rank:
        numerator = numerator.dense()  # fewer factor columns than singular triplets asked for
    if isinstance(numerator, FactoredNumerator):
        left = _HouseholderQR.of(numerator.left)
        return _top_singular_of_wide(left.q_times, times_w(left.r @ numerator.right), rank)
    m, n = numerator.shape[-2:]
    width = None if rank_bound is None else rank_bound + _SKETCH_OVERSAMPLING
    if width is None or 2 * width >= min(m, n):
        x = times_w(numerator)
        if m > n:  # the triplets of the wide xᵀ, transposed
            V, S, Uh = _top_singular_of_wide(lambda u: u, x.mT, rank)
            return Uh.mT, S, V.mT
        return _top_singular_of_wide(lambda u: u, x, rank)
    generator = torch.Generator(device=numerator.device).manual_seed(0)  # reproducible merges
    omega = torch.randn(n, width, generator=generator, dtype=numerator.dtype, device=numerator.device)
    Q = torch.linalg.qr(numerator @ (w_times(omega) if w_times is not None else omega)).Q
    return _top_singular_of_wide(lambda u: Q @ u, times_w(Q.mT @ numerator), rank)


def _top_singular_of_wide(q_times, core: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top ``rank`` singular triplets of x = Q C, Q with orthonormal columns (``q_times(M)`` = Q M) and C
    k × n with k ≤ n: C = R_Cᵀ Q_Cᵀ (the QR of Cᵀ), so the SVD of the k × k R_Cᵀ gives that of x, faster than
    the SVD of the wide C itself (a square C is decomposed as it is)."""
    if core.shape[-2] == core.shape[-1]:
        U, S, Vh = torch.linalg.svd(core)
        return q_times(U[..., :rank]), S[..., :rank], Vh[..., :rank, :]
    right = _HouseholderQR.of(core.mT)
    U, S, Vh = torch.linalg.svd(right.r.mT)
    return q_times(U[..., :rank]), S[..., :rank], right.q_times(Vh[..., :rank, :].mT).mT


def _cholesky_factor(gram: Tensor) -> Tensor | None:
    """L with G = L Lᵀ for every layer of a batch of full Grams, or None when one is not numerically positive
    definite (Cholesky fails, or a pivot L_ii² ≤ 1e-12 · max_j G_jj)."""
    L, info = torch.linalg.cholesky_ex(gram)
    if bool((info != 0).any()):
        return None
    pivots = L.diagonal(dim1=-2, dim2=-1).square()
    scale = gram.diagonal(dim1=-2, dim2=-1).amax(-1, keepdim=True)
    return None if bool((pivots <= _CHOLESKY_PIVOT_TOLERANCE * scale).any()) else L


def low_rank_exact(
    numerator: Tensor | FactoredNumerator,
    gram: Tensor,
    rank: int,
    rcond: float = DEFAULT_RCOND,
    *,
    rank_bound: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The rank-``rank`` minimiser in closed form, batched over layers (reference.rank_r_optimum_ref):
    B A = [M L]_r L⁺ with G = L Lᵀ and M = N G⁺; returns B = U_r S_r and A = V_rᵀ L⁺ (so A G Aᵀ = I).

    L is the Cholesky factor when every G of the batch is numerically positive definite: then M L = N L⁻ᵀ and
    A = V_rᵀ L⁻¹, two triangular solves. Otherwise (and for a non-default ``rcond``, which only the
    eigendecomposition honours exactly) L = U Λ^½ on the eigenvalues above rcond·λ_max, as the reference.
    A diagonal G is its own factor. ``rank_bound`` ≥ rank(N) lets the SVD run on a sketch, a ``FactoredNumerator``
    on its factors (``_top_singular``).
    """
    diagonal = gram.dim() == numerator.dim() - 1
    L = None if diagonal or rcond != DEFAULT_RCOND else _cholesky_factor(gram)
    if L is not None:  # W = L⁻ᵀ: M L = N G⁻¹ L = N L⁻ᵀ
        U, S, Vh = _top_singular(
            numerator,
            rank,
            rank_bound,
            lambda m: torch.linalg.solve_triangular(L.mT, m, upper=True, left=False),
            lambda omega: torch.linalg.solve_triangular(L.mT, omega, upper=True),
        )
        return U * S.unsqueeze(-2), torch.linalg.solve_triangular(L, Vh, upper=False, left=False)
    eigenvalues, eigenvectors = (gram, None) if diagonal else torch.linalg.eigh(gram)
    keep = eigenvalues > rcond * eigenvalues.abs().amax(-1, keepdim=True)
    root_inv = torch.where(keep, eigenvalues.clamp_min(0).rsqrt(), torch.zeros_like(eigenvalues)).unsqueeze(-2)
    if diagonal:  # W = diag(Λ^-½)
        U, S, Vh = _top_singular(numerator, rank, rank_bound, lambda m: m * root_inv, lambda o: root_inv.mT * o)
        return U * S.unsqueeze(-2), Vh * root_inv
    scaled = eigenvectors * root_inv  # W = U Λ^-½ (pseudo-inverse root: dropped eigenvalues give zero columns)
    U, S, Vh = _top_singular(numerator, rank, rank_bound, lambda m: m @ scaled, lambda o: scaled @ o)
    return U * S.unsqueeze(-2), Vh @ scaled.mT


def low_rank_alternating(
    numerator: Tensor,
    gram: Tensor,
    rank: int,
    *,
    init_a: Tensor | None = None,
    constant: Tensor | float = 0.0,
    max_iters: int = 500,
    tol: float = 1e-12,
    rcond: float = DEFAULT_RCOND,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Alternating exact B- and A-steps toward the rank-``rank`` optimum, batched over layers
    (reference.merge_adapters_ref, same stopping rule). ``constant`` is c per layer (see ``excess_objective``);
    a layer stops when a step lowers its objective by at most tol·|previous objective|.
    Returns B, A and the objective after each step (excess + constant)."""
    regmean = ops.psd_right_solve(numerator, gram, rcond)
    A = torch.linalg.svd(numerator, full_matrices=False)[2][..., :rank, :] if init_a is None else init_a.to(numerator)
    B = torch.zeros(*numerator.shape[:-1], rank, dtype=numerator.dtype, device=numerator.device)
    active = torch.ones(numerator.shape[:-2], dtype=torch.bool, device=numerator.device)
    history: list[Tensor] = []
    for _ in range(max_iters):
        B_next = ops.psd_right_solve(numerator @ A.mT, _times_gram(A, gram) @ A.mT, rcond)
        A_next = _solve_left(B_next.mT @ B_next, B_next.mT @ regmean, rcond)
        step = active[..., None, None]
        B, A = torch.where(step, B_next, B), torch.where(step, A_next, A)
        history.append(excess_objective(numerator, gram, B, A) + constant)
        if len(history) > 1:
            active &= (history[-2] - history[-1]) > tol * history[-2].abs()
        if not bool(active.any()):
            break
    return B, A, history


class _AdapterStream(RegMeanMerger):
    """AdapterMerger's sums: numerator N = Σ B_k (A_k G_k), denominator G = Σ G_k, with the arguments named as
    AdapterMerger's callers pass them."""

    _argument_names = {"factors": ("factors_a", "factors_a"), "lefts": ("factors_b", "factors_b")}


class AdapterMerger:
    """Merges LoRA adapters of any ranks — client k sends B_k (out × r_k), A_k (r_k × in) and G_k — into one
    rank-``rank`` adapter per layer, minimising Σ_k ‖X_k (B A − B_k A_k)ᵀ‖²_F.

    Streams G = Σ G_k and N = Σ B_k A_k G_k (one read of each Gram) and, with ``track_objective``, the
    constant c = Σ_k ‖X_k (B_k A_k)ᵀ‖² (one more read), so that ``objective`` scores any candidate exactly.
    ``merge("alternating")`` alternates exact steps; ``merge("exact")`` is the closed-form optimum.
    """

    METHODS = ("alternating", "exact")

    def __init__(self, rank: int, *, track_objective: bool = True, **kwargs):
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        self.rank = rank
        self._stream = _AdapterStream(**kwargs)
        self.track_objective = track_objective
        self._constants: dict[str, Tensor] = {}

    @property
    def num_clients(self) -> int:
        return self._stream.num_clients

    def add_client(
        self, factors_b: Mapping[str, Tensor], factors_a: Mapping[str, Tensor], grams: Mapping[str, Tensor]
    ) -> None:
        for name, b in factors_b.items() if isinstance(factors_b, Mapping) and isinstance(grams, Mapping) else ():
            gram = grams.get(name)
            if isinstance(b, Tensor) and isinstance(gram, Tensor) and min(b.dim(), gram.dim()) > 0:  # else: below
                check_rank_fits(name, self.rank, b.shape[0], gram.shape[0])
        self._stream.add_client(factors_a, grams, lefts=factors_b)
        if self.track_objective:  # c_k = ‖X_k (B_k A_k)ᵀ‖² = ⟨B_k, B_k P_k⟩ with P_k = A_k G_k A_kᵀ
            weighted, _ = _projected(factors_a, factors_b, grams, self._stream.dtype)
            for name, b in factors_b.items():
                constant = (b.to(weighted[name]) * weighted[name]).sum().to(self._stream.device)
                self._constants[name] = self._constants.get(name, 0) + constant

    @property
    def merge_key(self) -> tuple:
        """What this merger merges (as ``StreamingMerger.merge_key``): its rank and whether it tracks the
        objective."""
        return (type(self).__name__, self.rank, self.track_objective)

    def state_dict(self) -> dict:
        """The stream's sums and client count, and the objective constants (views, not copies)."""
        return {"stream": self._stream.state_dict(), "constants": dict(self._constants)}

    def load_state_dict(self, state: Mapping) -> None:
        """Replaces the state with ``state_dict()`` output, all checked before anything changes: the stream as
        ``RegMeanMerger.load_state_dict``, the objective constants by ``_check_constants``. "constants" may be
        absent when there are none (``all_reduce_merger_`` drops an empty dict)."""
        if not isinstance(state, Mapping) or "stream" not in state or not set(state) <= {"stream", "constants"}:
            got = sorted(map(str, state)) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"load_state_dict: expected a dict with the keys ['stream', 'constants'], got {got}")
        constants = state.get("constants", {})
        self._check_constants(state["stream"], constants)
        self._stream.load_state_dict(state["stream"])
        self._constants = dict(constants)

    def _check_constants(self, stream, constants) -> None:
        """With track_objective, one finite scalar tensor of the sums' dtype per layer of the stream's state;
        without it, none."""
        if not isinstance(constants, Mapping):
            raise ValueError(f"load_state_dict: constants must be a dict of tensors, got {type(constants).__name__}")
        if constants and not self.track_objective:
            raise ValueError("load_state_dict: the state has objective constants; this merger: track_objective=False")
        if not self.track_objective:
            return
        sums = stream.get("sums") if isinstance(stream, Mapping) else None
        # the layers of a well-formed stream state; a malformed one fails its own check next
        keys = sums if isinstance(sums, Mapping) else ()
        layers = [k.removesuffix(".numerator") for k in keys if str(k).endswith(".numerator")]
        if layers and not constants:
            raise ValueError("load_state_dict: the state has no objective constants (track_objective=False?)")
        check_layer_names(layers, constants, "load_state_dict: constants")
        dtype = self._stream.dtype
        for name, constant in constants.items():
            if not isinstance(constant, Tensor) or constant.shape != () or constant.dtype != dtype:
                got = f"{constant.dtype} {tuple(constant.shape)}" if isinstance(constant, Tensor) else type(constant)
                raise ValueError(f"load_state_dict: layer {name!r}: constant must be a {dtype} scalar, got {got}")
            if self._stream.validate and not bool(torch.isfinite(constant)):
                raise ValueError(f"load_state_dict: layer {name!r}: constant is {float(constant)}, not finite")

    def _groups(self) -> list[SumGroup]:
        if self.num_clients == 0:
            raise ValueError("AdapterMerger: no clients were added, nothing to merge")
        return self._stream.sum_groups

    def merge(
        self, method: str = "alternating", *, init_a: Mapping[str, Tensor] | None = None, **options
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """{layer: (B, A)}. ``init_a`` ({layer: rank × in}) starts the alternation; other options
        (max_iters, tol) go to ``low_rank_alternating``."""
        if method not in self.METHODS:
            raise ValueError(f"unknown merge method {method!r}; choose one of {self.METHODS}")
        if init_a is not None:
            check_layer_names(self._stream.layers, init_a, "init_a")
        rcond = self._stream.rcond
        out = {}
        for group in self._groups():
            if method == "exact":
                B, A = low_rank_exact(group.numerators, group.denominators, self.rank, rcond)
            else:
                start = None if init_a is None else torch.stack([init_a[n] for n in group.names])
                constant = torch.stack([self._constants[n] for n in group.names]) if self.track_objective else 0.0
                B, A, _ = low_rank_alternating(
                    group.numerators,
                    group.denominators,
                    self.rank,
                    init_a=start,
                    constant=constant,
                    rcond=rcond,
                    **options,
                )
            out.update({name: (B[i], A[i]) for i, name in enumerate(group.names)})
        return out

    def objective(self, factors: Mapping[str, tuple[Tensor, Tensor]]) -> dict[str, float]:
        """Σ_k ‖X_k (B A − B_k A_k)ᵀ‖² per layer for candidate factors {layer: (B, A)}, from the sums alone."""
        if not self.track_objective:
            raise ValueError("objective needs AdapterMerger(track_objective=True)")
        check_layer_names(self._stream.layers, factors, "factors")
        out = {}
        for group in self._groups():
            for i, name in enumerate(group.names):
                B, A = (t.to(group.numerators) for t in factors[name])
                excess = excess_objective(group.numerators[i], group.denominators[i], B, A)
                out[name] = float(excess + self._constants[name])
        return out
