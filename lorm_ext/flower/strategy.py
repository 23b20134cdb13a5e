"""``LoRAMergeStrategy``: closed-form merging of LoRA adapters as a Flower strategy (flwr 1.41 Message API) for any
Flower app and any LoRA model; the FCIL ``LoRMStrategy`` (``fcil_strategy``) is built on it.

Each round every connected node gets a "train" message with the current adapter ("arrays": "B/<module>",
"A/<module>" of every module the strategy names; empty in round 1 unless the app gives an initial adapter), trains
its own LoRA model however it likes and replies with its factors and the Grams of those modules' inputs
(``messages.lora_reply``): "arrays" B_k (out × r_k) and A_k (r_k × in), "grams" G_k (in × in, or its diagonal
when the strategy says ``diagonal_grams``), "metrics" "num-examples". The factors are those of ΔW_k = B_k A_k:
a client whose LoRA scales its update by s sends s·B_k. The server merges the replies, in increasing node id so
that float sums are ordered, with ``merge.AdapterMerger``: the rank-``rank`` adapter minimising
Σ_k ‖X_k (B A − B_k A_k)ᵀ‖²_F, in closed form (``method="exact"``) or by exact alternating steps from the
current A (``"alternating"``), rescaled so that each rank component's column of B and row of A have equal norms
(``balanced``: the product is what the merge fixes). The server never holds more than one reply's tensors besides the running sums.

A reply that is an error or not what the round asked for (missing or unexpected tensors, unreadable arrays,
wrong shapes, NaN/Inf, a Gram that is not one, bad metrics) is dropped with a WARNING naming the node and the
problem, and the round merges the others; a reply from a node that was not asked is ignored with a WARNING; a
round without any usable reply raises ``NoUsableReplyError``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from torch import Tensor

from ..fcil.protocol import factor_key, gram_key
from ..merge import AdapterMerger
from ..reference import DEFAULT_RCOND
from ..validation import LayerError
from .messages import check_message, read_reply, reply_seconds

NODE_POLL_SECONDS = 0.1


class NoUsableReplyError(RuntimeError):
    """No asked node sent a usable reply in a round: there is nothing to merge."""


class ReplyRounds(Strategy):
    """What every strategy here shares: waiting for nodes, one message per asked node, and the replies checked
    and handed on one at a time in increasing label order (the label of a node: its node id here, its FCIL
    client id in ``LoRMStrategy``)."""

    label = "node"  # how log lines and errors name what a label counts

    def _wait_for_nodes(self, grid: Grid, wanted: int, timeout: float) -> list[int]:
        """The sorted node ids once at least ``wanted`` are connected, or after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while len(nodes := sorted(grid.get_node_ids())) < wanted and time.monotonic() < deadline:
            time.sleep(NODE_POLL_SECONDS)
        return nodes

    def _who(self, label: int, node: int) -> str:
        return f"node {node}"

    def _messages(self, asked: Mapping[int, int], content: Callable[[int], RecordDict], message_type: str):
        """One message per asked {label: node}, ``content(label)`` its content."""
        return [Message(content(label), dst_node_id=node, message_type=message_type) for label, node in asked.items()]

    def _collect(
        self,
        replies: Iterable[Message],
        asked: Mapping[int, int],
        where: str,
        check: Callable[[RecordDict], tuple[dict[str, Tensor], dict[str, float]]],
        fold: Callable[[int, dict[str, Tensor]], None],
    ) -> MetricRecord:
        """Checks each reply (``check(content)``: the message and its seconds, or a ValueError naming the problem)
        and folds the usable ones (``fold(label, message)``) in increasing label, one at a time; the round's
        metrics. ``fold`` is outside the check: a message that passed ``check`` and still fails is a bug, and the
        server may hold part of it."""
        label_of = {node: label for label, node in asked.items()}
        by_label = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in label_of:
                log(WARNING, "%s: ignored a reply from node %d, which was not asked", where, node)
                continue
            by_label[label_of[node]] = reply
        totals = {"num-examples": 0, "train-seconds": 0.0, "gram-seconds": 0.0}  # over the merged replies
        problems = {}
        for label in sorted(asked):
            reply = by_label.get(label)
            if reply is None:
                problems[label] = "no reply before the timeout"
                continue
            if reply.has_error():
                problems[label] = f"the client failed: {reply.error.reason}"
                continue
            try:
                message, seconds = check(reply.content)
            except ValueError as error:
                problems[label] = str(error)
                continue
            fold(label, message)
            totals["num-examples"] += int(message["num_samples"])
            for key, value in seconds.items():
                totals[key] += value
        for label, problem in problems.items():
            log(WARNING, "%s: dropped the reply of %s: %s", where, self._who(label, asked[label]), problem)
        merged = len(asked) - len(problems)
        if merged == 0:
            details = "; ".join(f"{self.label} {label}: {problem}" for label, problem in problems.items())
            raise NoUsableReplyError(f"{where}: no usable reply from the {len(asked)} {self.label}s ({details})")
        log(INFO, "%s: merged %d of %d %ss", where, merged, len(asked), self.label)
        return MetricRecord(totals | {self.label + "s": merged, "dropped": len(problems)})

    # The server's model is evaluated centrally (``evaluate_fn``), not on the clients.
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None


class LoRAMergeStrategy(ReplyRounds):
    """Merges the LoRA adapters of the nodes every round (see the module docstring).

    module_shapes: {module: (out, in)}, the modules the ClientApp adapts and reports (any names the app agrees
    on); rank: the merged adapter's rank (at most min(out, in) of every module); method: "exact" or
    "alternating"; diagonal_grams: the nodes send only the diagonal of each Gram (the fast path); min_nodes:
    nodes to wait for before the first round; rcond: of the pseudo-inverses."""

    METHODS = AdapterMerger.METHODS

    def __init__(
        self,
        module_shapes: Mapping[str, tuple[int, int]],
        rank: int,
        *,
        method: str = "exact",
        diagonal_grams: bool = False,
        min_nodes: int = 1,
        rcond: float = DEFAULT_RCOND,
    ):
        if not isinstance(module_shapes, Mapping) or not module_shapes:
            raise ValueError("LoRAMergeStrategy: module_shapes must name at least one module, as {module: (out, in)}")
        for name, shape in module_shapes.items():
            if len(shape) != 2 or not all(isinstance(d, int) and d > 0 for d in shape):
                raise ValueError(f"LoRAMergeStrategy: module {name!r} has shape {shape!r}, expected (out, in) > 0")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"LoRAMergeStrategy: rank must be a positive integer, got {rank!r}")
        too_small = [n for n, shape in module_shapes.items() if rank > min(shape)]
        if too_small:
            shape = module_shapes[too_small[0]]
            name = too_small[0]
            raise ValueError(f"LoRAMergeStrategy: rank {rank} exceeds module {name!r} ({shape[0]} × {shape[1]})")
        if method not in self.METHODS:
            raise ValueError(f"LoRAMergeStrategy: method must be one of {self.METHODS}, got {method!r}")
        if not isinstance(min_nodes, int) or min_nodes < 1:
            raise ValueError(f"LoRAMergeStrategy: min_nodes must be a positive integer, got {min_nodes!r}")
        self.module_shapes = {name: tuple(shape) for name, shape in module_shapes.items()}
        self.rank, self.method, self.diagonal_grams = rank, method, diagonal_grams
        self.min_nodes, self.rcond = min_nodes, rcond
        self.adapter: dict[str, Tensor] = {}  # "B/<module>", "A/<module>": the current merged adapter
        self._asked: dict[int, int] = {}  # node id -> node id, of the round in progress

    def summary(self) -> None:
        log(INFO, "\t├──> %d modules, merged rank %d (%s)", len(self.module_shapes), self.rank, self.method)
        grams = "diagonal" if self.diagonal_grams else "full"
        log(INFO, "\t└──> Grams: %s, at least %d nodes", grams, self.min_nodes)

    def expected_shapes(self) -> dict[str, tuple[int | None, ...]]:
        """What a reply holds, by key (None: any rank)."""
        shapes: dict[str, tuple[int | None, ...]] = {}
        for name, (out_features, in_features) in self.module_shapes.items():
            shapes[factor_key("B", name)] = (out_features, None)
            shapes[factor_key("A", name)] = (None, in_features)
            shapes[gram_key(name)] = (in_features,) if self.diagonal_grams else (in_features, in_features)
        return shapes

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600.0,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """``num_rounds`` rounds of ``configure_train`` / ``aggregate_train``. initial_arrays: the adapter of
        round 1 ("B/<module>", "A/<module>" for every module, or empty: the nodes start from their own);
        train_config: sent to every node each round (with "server-round"); timeout: seconds to wait for
        ``min_nodes`` nodes, and for each round's replies; evaluate_fn(server_round, arrays) after every round.
        Returns the final adapter and the metrics of every round."""
        log(INFO, "Starting %s:", type(self).__name__)
        self.summary()
        arrays = initial_arrays
        self.adapter = self._checked_adapter(arrays.to_torch_state_dict())
        nodes = self._wait_for_nodes(grid, self.min_nodes, timeout)
        if len(nodes) < self.min_nodes:
            raise ConnectionError(
                f"LoRAMergeStrategy: min_nodes is {self.min_nodes} but {len(nodes)} nodes are connected after "
                f"waiting up to {timeout:g} s"
            )
        result = Result()
        for server_round in range(1, num_rounds + 1):
            messages = self.configure_train(server_round, arrays, train_config or ConfigRecord(), grid)
            replies = grid.send_and_receive(messages, timeout=timeout)
            arrays, metrics = self.aggregate_train(server_round, replies)
            result.train_metrics_clientapp[server_round] = metrics
            if evaluate_fn is not None:
                evaluation = evaluate_fn(server_round, arrays)
                log(INFO, "\t└──> evaluation: %s", evaluation)
                if evaluation is not None:
                    result.evaluate_metrics_serverapp[server_round] = evaluation
        result.arrays = arrays
        return result

    def _checked_adapter(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """An initial adapter: empty, or exactly "B/<module>" (out × rank) and "A/<module>" (rank × in) of every
        module; a ValueError names the first problem."""
        if not tensors:
            return {}
        wanted = {}
        for name, (out_features, in_features) in self.module_shapes.items():
            wanted[factor_key("B", name)] = (out_features, self.rank)
            wanted[factor_key("A", name)] = (self.rank, in_features)
        if set(tensors) != set(wanted):
            raise ValueError(
                f"LoRAMergeStrategy: the initial adapter must be empty or hold exactly {sorted(wanted)}, got "
                f"{sorted(tensors)}"
            )
        for key, shape in wanted.items():
            if tuple(tensors[key].shape) != shape:
                got = tuple(tensors[key].shape)
                raise ValueError(f"LoRAMergeStrategy: initial {key!r} has shape {got}, expected {shape}")
        return dict(tensors)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """A "train" message with the current adapter to every connected node."""
        self._asked = {node: node for node in sorted(grid.get_node_ids())}
        self._round = server_round
        scalars = ConfigRecord(dict(config) | {"server-round": server_round})
        return self._messages(
            self._asked, lambda _: RecordDict({"arrays": arrays, "config": scalars}), MessageType.TRAIN
        )

    def _check(self, content: RecordDict) -> tuple[dict[str, Tensor], dict[str, float]]:
        message = read_reply(content)
        check_message(message, self.expected_shapes())
        for name in self.module_shapes:
            b, a = message[factor_key("B", name)], message[factor_key("A", name)]
            if b.shape[1] != a.shape[0]:
                raise LayerError(name, f"B has rank {b.shape[1]} but A has rank {a.shape[0]}")
        return message, reply_seconds(content)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The usable replies into one ``AdapterMerger``, in increasing node id; the merged adapter (in the
        dtype the first usable reply's factors had) and the round's metrics."""
        merger = AdapterMerger(self.rank, track_objective=False, rcond=self.rcond)
        dtypes = []

        def fold(node: int, message: dict[str, Tensor]) -> None:
            dtypes.append(message[factor_key("B", next(iter(self.module_shapes)))].dtype)
            # float64 like the sums: the nodes may send any floating dtype, each tensor its own
            message = {k: v.to(torch.float64) for k, v in message.items() if k != "num_samples"}
            factors = {f: {n: message[factor_key(f, n)] for n in self.module_shapes} for f in "BA"}
            merger.add_client(factors["B"], factors["A"], {n: message[gram_key(n)] for n in self.module_shapes})

        metrics = self._collect(replies, self._asked, f"round {server_round}", self._check, fold)
        init_a = None
        if self.method == "alternating" and self.adapter:
            init_a = {n: self.adapter[factor_key("A", n)] for n in self.module_shapes}
        merged = merger.merge(self.method, init_a=init_a)
        self.adapter = {}
        for name, (b, a) in merged.items():
            b, a = balanced(b, a)
            self.adapter |= {factor_key("B", name): b.to(dtypes[0]), factor_key("A", name): a.to(dtypes[0])}
        return ArrayRecord(dict(self.adapter)), metrics


def balanced(b: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """The same B A with each rank component's column of B and row of A of equal norm. The merge fixes only the
    product; the exact solve returns A with A G Aᵀ = I, whose scale (set by the Grams) local training with Adam
    would then destroy: nodes start the next round from comparable factors instead."""
    b_norm, a_norm = b.norm(dim=0), a.norm(dim=1)
    scale = torch.where((b_norm > 0) & (a_norm > 0), (a_norm / b_norm).sqrt(), torch.ones_like(b_norm))
    return b * scale, a / scale[:, None]
