"""``LoRMStrategy``: the LoRM server of ``lorm_ext.fcil`` on Flower's Message API (``flwr.serverapp.strategy``).

One ``start`` runs the whole FCIL protocol over the grid: per task, ``num_comm_rounds`` training rounds
(``configure_train`` / ``aggregate_train``: the B- or A-step of the factors and RegMean of the head) and the
end-of-task Gram collection (``configure_task_grams`` / ``aggregate_task_grams``, the custom message type
"query.task_grams") that feeds the cross-task merge. The merges are ``fcil.strategies.LoRM``'s, fed the replies
in increasing client id, so a Flower run reproduces the in-process ``fcil.run`` bit for bit.

Clients: the run needs exactly ``num_clients`` nodes; the node with the k-th smallest node id plays FCIL client
k (its shard of the split, its seeds), which the instruction tells it. A reply that is an error, or whose
message is not what ``client_step`` sends for the instruction (missing or unexpected tensors, arrays that are not
readable tensors, wrong dtypes or shapes, NaN/Inf, a Gram that is not one, bad metrics), is dropped with a WARNING
naming the client and the problem; the round merges the others; a reply from a node that was not asked is
ignored with a WARNING. A round without any usable reply raises ``NoUsableReplyError``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from ..fcil.config import ConfigError, RunConfig, validate
from ..fcil.protocol import FIT, TASK_GRAMS, Instruction, close_unit, message_shapes, open_unit, participants, units
from ..fcil.strategies import LoRM
from .messages import (
    MESSAGE_TYPES,
    check_message,
    instruction_content,
    instruction_records,
    read_reply,
    reply_seconds,
)

NODE_POLL_SECONDS = 0.1


class NoUsableReplyError(RuntimeError):
    """No selected client sent a usable reply in a round: there is nothing to merge."""


class LoRMStrategy(Strategy):
    """LoRM's closed-form merges as a Flower strategy (see the module docstring).

    config: the run (``strategy="lorm"``); layer_shapes: (out, in) of every adapted layer; task_classes: per task,
    (first class, number of classes), as the data set numbers them."""

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
        self.instruction: Instruction | None = None  # of the round in progress
        self._node_of: dict[int, int] = {}  # client id -> node id
        self._client_of: dict[int, int] = {}
        self._asked: list[int] = []  # the clients of the round in progress

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
        return self._messages(arrays, config, MESSAGE_TYPES[FIT])

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The usable replies into the merge; returns the merged factors and head, and the round's metrics."""
        metrics = self._receive(replies)
        self.server.close()
        return ArrayRecord(dict(self.server.current)), metrics

    def configure_task_grams(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """A "query.task_grams" message to each participant: the Grams of the task's final model."""
        return self._messages(arrays, config, MESSAGE_TYPES[TASK_GRAMS])

    def aggregate_task_grams(self, server_round: int, replies: Iterable[Message]) -> MetricRecord:
        """The usable Grams into the cross-task sums; the task's update joins the finished ones."""
        metrics = self._receive(replies)
        self.server.close_task()
        return metrics

    # The FCIL protocol evaluates the server's model centrally (``evaluate_fn``), not on the clients.
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def model_arrays(self) -> ArrayRecord:
        """The server's model, as the driver's adapters.safetensors (``Server.model_tensors``)."""
        return ArrayRecord(self.server.model_tensors())

    def _connect(self, grid: Grid, timeout: float) -> None:
        """Waits (at most ``timeout`` s) for num_clients nodes and gives the k-th smallest node id client id k."""
        wanted = self.config.num_clients
        deadline = time.monotonic() + timeout
        while len(nodes := sorted(grid.get_node_ids())) < wanted and time.monotonic() < deadline:
            time.sleep(NODE_POLL_SECONDS)
        if len(nodes) != wanted:
            raise ConfigError(
                f"the run has num_clients {wanted} (one node per FCIL client) but {len(nodes)} nodes are connected "
                f"after waiting up to {timeout:g} s"
            )
        self._node_of = dict(enumerate(nodes))
        self._client_of = {node: client for client, node in self._node_of.items()}

    def _where(self) -> str:
        inst = self.instruction
        return f"task {inst.task} " + (f"round {inst.round}" if inst.phase == FIT else "end (Grams)")

    def _messages(self, arrays: ArrayRecord, config: ConfigRecord, message_type: str) -> list[Message]:
        self._asked = participants(self.config, int(config["task"]))
        return [
            Message(
                instruction_content(arrays, config, client),
                dst_node_id=self._node_of[client],
                message_type=message_type,
            )
            for client in self._asked
        ]

    def _receive(self, replies: Iterable[Message]) -> MetricRecord:
        """Checks each reply and hands the usable ones to the server in increasing client id, one at a time."""
        head_shape = tuple(self.server.current["head/weight"].shape)
        expected = message_shapes(self.instruction, self.config, self.layer_shapes, head_shape)
        by_client = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if self._client_of.get(node) not in self._asked:
                log(WARNING, "%s: ignored a reply from node %d, which was not asked", self._where(), node)
                continue
            by_client[self._client_of[node]] = reply
        totals = {"num-examples": 0, "train-seconds": 0.0, "gram-seconds": 0.0}  # over the merged clients
        problems = {}
        for client in self._asked:
            reply = by_client.get(client)
            if reply is None:
                problems[client] = "no reply before the timeout"
                continue
            if reply.has_error():
                problems[client] = f"the client failed: {reply.error.reason}"
                continue
            try:
                message = read_reply(reply.content)
                check_message(message, expected)
                seconds = reply_seconds(reply.content)
            except ValueError as error:
                problems[client] = str(error)
                continue
            # not inside the try: a message that passed check_message and still fails here is a bug, and the
            # server may hold part of it
            self.server.receive(message)
            totals["num-examples"] += int(message["num_samples"])
            for key, value in seconds.items():
                totals[key] += value
        for client, problem in problems.items():
            log(WARNING, "%s: dropped the reply of client %d (node %d): %s", self._where(), client,
                self._node_of[client], problem)  # fmt: skip
        merged = len(self._asked) - len(problems)
        if merged == 0:
            details = "; ".join(f"client {client}: {problem}" for client, problem in problems.items())
            raise NoUsableReplyError(
                f"{self._where()}: no usable reply from the {len(self._asked)} clients ({details})"
            )
        log(INFO, "%s: merged %d of %d clients", self._where(), merged, len(self._asked))
        return MetricRecord(totals | {"clients": merged, "dropped": len(problems)})
