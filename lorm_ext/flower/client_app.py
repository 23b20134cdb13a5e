"""The FCIL client as a Flower ClientApp: ``app`` answers "train" (a training round) and "query.task_grams" (the
Grams of the task's final model) with ``fcil.client_step`` on the client's shard of the run's split.

A node keeps the run's data and model between messages (one run at a time): the backbone weights never change,
and every message carries the factors and head the step starts from, so the reply depends on the message alone.
"""

from __future__ import annotations

import functools

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from ..fcil.client import client_step
from ..fcil.config import RunConfig
from ..fcil.driver import RunData, prepare
from ..fcil.model import AdaptedViT, build_model
from ..fcil.protocol import TASK_GRAMS
from .messages import read_instruction, reply_content

app = ClientApp()


@functools.lru_cache(maxsize=1)
def run_state(config: RunConfig) -> tuple[RunData, AdaptedViT]:
    """The run's data, split and model, built once per node (as the in-process driver builds them)."""
    data = prepare(config)
    return data, build_model(config, data.dataset.num_classes, data.weights)


def _step(message: Message) -> Message:
    instruction, config, client_id = read_instruction(message.content)
    torch.set_num_threads(config.num_threads)
    data, model = run_state(config)
    indices = data.splits[instruction.task].train[client_id]
    reply = client_step(model, data.dataset.train, indices, instruction, config, client_id)
    return Message(reply_content(reply), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    return _step(message)


@app.query(TASK_GRAMS)
def task_grams(message: Message, context: Context) -> Message:
    return _step(message)
