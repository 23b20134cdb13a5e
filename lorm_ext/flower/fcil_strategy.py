"""``LoRMStrategy``: the FCIL protocol (``lorm_ext.fcil.protocol``) with the LoRM server of ``fcil.strategies`` on
Flower's Message API, built on ``strategy.ReplyRounds`` (nodes, messages, checked replies in order).

One ``start`` runs the whole FCIL protocol over the grid: per unit of ``protocol.units``, a training round
(``configure_train`` / ``aggregate_train``: the B- or A-step of the factors and RegMean of the head) or the
end-of-task Gram collection (``configure_task_grams`` / ``aggregate_task_grams``, the custom message type
"query.task_grams") that feeds the cross-task merge. The merges are ``fcil.strategies.LoRM``'s, fed the replies
in increasing client id, so a Flower run reproduces the in-process ``fcil.run`` bit for bit.

Clients: the run needs exactly ``num_clients`` nodes; the node with the k-th smallest node id plays FCIL client
k (its shard of the split, its seeds), which the instruction tells it. A reply that is an error, or whose
message is not what ``protocol.message_shapes`` says the instruction asks for, is dropped with a WARNING naming
the client and the problem (``ReplyRounds``); the round merges the others.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from ..fcil.config import ConfigError, RunConfig, validate
from ..fcil.protocol import (
    FIT,
    HEAD_WEIGHT,
    TASK_GRAMS,
    Instruction,
    close_unit,
    message_shapes,
    open_unit,
    participants,
    units,
)
from ..fcil.strategies import LoRM
from .messages import (
    MESSAGE_TYPES,
    check_message,
    instruction_content,
    instruction_records,
    read_reply,
    reply_seconds,
)
from .strategy import ReplyRounds


class LoRMStrategy(ReplyRounds):
    """LoRM's closed-form merges of the FCIL protocol as a Flower strategy (see the module docstring).

    config: the run (``strategy="lorm"``); layer_shapes: (out, in) of every adapted layer; task_classes: per task,
    (first class, number of classes), as the data set numbers them."""

    label = "client"

    def __init__(
        self, config: RunConfig, layer_shapes: Mapping[str, tuple[int, int]], task_classes: Sequence[tuple[int, int]]
    ):
        if config.strategy != "lorm":
            raise ConfigError(f"LoRMStrategy runs strategy 'lorm', got a configuration of {config.strategy!r}")
        validate(config)
        self.config = config
        self.layer_shapes = dict(layer_shapes)
        self.task_classes = list(task_classes)
        self.server: LoRM | None = None
        self.instruction: Instruction | None = None  # of the unit in progress
        self._round: int | None = None  # of the unit in progress; None: a task end
        self._node_of: dict[int, int] = {}  # client id -> node id
        self._asked: dict[int, int] = {}  # client id -> node id, of the unit in progress

    def summary(self) -> None:
        c = self.config
        log(INFO, "\t├──> %d clients, %d tasks × %d rounds", c.num_clients, len(self.task_classes), c.num_comm_rounds)
        log(INFO, "\t├──> participation %.2f, rank %d, train_matrix %s", c.participation_rate, c.r, c.train_matrix)
        log(
            INFO,
            "\t└──> Grams: α head %.2f, α backbone %.2f, prereduce %s",
            c.alpha_regmean_head,
            c.alpha_regmean_backbone,
            c.prereduce,
        )

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        timeout: float = 3600.0,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Runs every task's rounds and task end; server_round numbers them together, from 1. initial_arrays: the
        initial head ("head/weight", "head/bias"); timeout: seconds to wait for the nodes, and for each round's
        replies; evaluate_fn(server_round, arrays) is called after every round and task end with
        ``model_arrays()``. Returns the final ``model_arrays()`` and the metrics of every server round."""
        log(INFO, "Starting %s:", type(self).__name__)
        self.summary()
        head = initial_arrays.to_torch_state_dict()
        self.server = LoRM(self.config, self.layer_shapes, {"weight": head["head/weight"], "bias": head["head/bias"]})
        self._connect(grid, timeout)
        result = Result()
        for server_round, (task, round_) in enumerate(units(self.config, len(self.task_classes)), start=1):
            self.instruction = open_unit(self.server, task, round_, self.task_classes[task])  # LoRM always asks
            self._round = round_
            arrays, config = instruction_records(self.instruction, self.config)
            if round_ is None:
                replies = grid.send_and_receive(
                    self.configure_task_grams(server_round, arrays, config, grid), timeout=timeout
                )
                metrics = self.aggregate_task_grams(server_round, replies)
            else:
                replies = grid.send_and_receive(
                    self.configure_train(server_round, arrays, config, grid), timeout=timeout
                )
                _, metrics = self.aggregate_train(server_round, replies)
            result.train_metrics_clientapp[server_round] = metrics
            if evaluate_fn is not None:
                evaluation = evaluate_fn(server_round, self.model_arrays())
                log(INFO, "\t└──> evaluation: %s", evaluation)
                if evaluation is not None:
                    result.evaluate_metrics_serverapp[server_round] = evaluation
        result.arrays = self.model_arrays()
        return result

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """A "train" message with the round's instruction to each of the task's participants."""
        return self._unit_messages(arrays, config, MESSAGE_TYPES[FIT])

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The usable replies into the merge; returns the merged factors and head, and the round's metrics."""
        metrics = self._close_unit(replies)
        return ArrayRecord(dict(self.server.current)), metrics

    def configure_task_grams(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """A "query.task_grams" message to each participant: the Grams of the task's final model."""
        return self._unit_messages(arrays, config, MESSAGE_TYPES[TASK_GRAMS])

    def aggregate_task_grams(self, server_round: int, replies: Iterable[Message]) -> MetricRecord:
        """The usable Grams into the cross-task sums; the task's update joins the finished ones."""
        return self._close_unit(replies)

    def model_arrays(self) -> ArrayRecord:
        """The server's model, as the driver's adapters.safetensors (``Server.model_tensors``)."""
        return ArrayRecord(self.server.model_tensors())

    def _connect(self, grid: Grid, timeout: float) -> None:
        """Waits (at most ``timeout`` s) for num_clients nodes and gives the k-th smallest node id client id k."""
        wanted = self.config.num_clients
        nodes = self._wait_for_nodes(grid, wanted, timeout)
        if len(nodes) != wanted:
            raise ConfigError(
                f"the run has num_clients {wanted} (one node per FCIL client) but {len(nodes)} nodes are connected "
                f"after waiting up to {timeout:g} s"
            )
        self._node_of = dict(enumerate(nodes))

    def _who(self, client: int, node: int) -> str:
        return f"client {client} (node {node})"

    def _where(self) -> str:
        inst = self.instruction
        return f"task {inst.task} " + (f"round {inst.round}" if inst.phase == FIT else "end (Grams)")

    def _unit_messages(self, arrays: ArrayRecord, config: ConfigRecord, message_type: str) -> list[Message]:
        self._asked = {client: self._node_of[client] for client in participants(self.config, int(config["task"]))}
        return self._messages(self._asked, lambda client: instruction_content(arrays, config, client), message_type)

    def _close_unit(self, replies: Iterable[Message]) -> MetricRecord:
        """Each usable reply into the server in increasing client id, then the unit's merge."""
        head_shape = tuple(self.server.current[HEAD_WEIGHT].shape)
        expected = message_shapes(self.instruction, self.config, self.layer_shapes, head_shape)

        def check(content):
            message = read_reply(content)
            check_message(message, expected)
            return message, reply_seconds(content)

        metrics = self._collect(replies, self._asked, self._where(), check, lambda _, m: self.server.receive(m))
        close_unit(self.server, self._round)
        return metrics
