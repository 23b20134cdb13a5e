"""Quickstart (docs/flower.md): ``LoRAMergeStrategy`` in a Flower app of its own, with a PEFT LoRA model and no
part of the FCIL driver. Three nodes each hold a differently shifted slice of one classification task; every
round each node trains the LoRA factors of ``fc1`` and ``fc2`` of a small frozen MLP, and replies with its
factors and the Grams of those layers' inputs; the server merges them in closed form and evaluates the merged
adapter on every node's test data.

    python -m lorm_ext.flower.quickstart        # Flower's simulation engine, 3 nodes, 3 rounds

Needs ``peft`` and ``flwr[simulation]``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from peft import LoraConfig, get_peft_model
from torch import nn

from ..gram import GramCollector
from .messages import lora_reply, read_adapter
from .strategy import LoRAMergeStrategy

MODULES = {"fc1": (32, 16), "fc2": (4, 32)}  # the adapted layers: (out, in)
RANK, NUM_NODES, NUM_ROUNDS, LOCAL_STEPS = 4, 3, 3, 30


def lora_model() -> nn.Module:
    """The same frozen MLP and LoRA initialisation on every node and on the server."""
    torch.manual_seed(0)
    mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(16, 32), act=nn.Tanh(), fc2=nn.Linear(32, 4)))
    return get_peft_model(mlp, LoraConfig(r=RANK, lora_alpha=8, target_modules=list(MODULES)))


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: model.get_base_model().get_submodule(name) for name in MODULES}


def load_adapter(model: nn.Module, arrays: ArrayRecord) -> None:
    """The merged adapter the server sent, into the model's LoRA factors (none in round 1: keep PEFT's init)."""
    layers = lora_layers(model)
    adapter = read_adapter(arrays, MODULES, scaling={n: layer.scaling["default"] for n, layer in layers.items()})
    with torch.no_grad():
        for name, (b, a) in adapter.items():
            layers[name].lora_B["default"].weight.copy_(b)
            layers[name].lora_A["default"].weight.copy_(a)


def node_data(partition: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A partition's inputs (shifted per node) and the labels a fixed random teacher gives them."""
    g = torch.Generator().manual_seed(1000 * partition + (split == "test"))
    x = torch.randn(256, 16, generator=g) + 0.5 * partition
    teacher = torch.randn(16, 4, generator=torch.Generator().manual_seed(7))
    return x, (torch.tanh(x) @ teacher).argmax(1)


client_app = ClientApp()


@client_app.train()
def train(message: Message, context: Context) -> Message:
    model = lora_model()
    load_adapter(model, message.content["arrays"])
    x, y = node_data(int(context.node_config["partition-id"]), "train")
    trained = [p for p in model.parameters() if p.requires_grad]  # the LoRA factors only
    optimizer = torch.optim.Adam(trained, lr=1e-2)
    for _ in range(LOCAL_STEPS):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    collector = GramCollector(model, r"(^|\.)(fc1|fc2)$")  # the inputs of the adapted layers
    with torch.no_grad(), collector:
        model(x)
    layers = lora_layers(model)
    factors = {n: (layer.lora_B["default"].weight, layer.lora_A["default"].weight) for n, layer in layers.items()}
    grams = {n: collector.grams[f"base_model.model.{n}"] for n in MODULES}
    scaling = {n: layer.scaling["default"] for n, layer in layers.items()}
    return Message(lora_reply(factors, grams, len(x), scaling=scaling), reply_to=message)


def accuracy(arrays: ArrayRecord) -> float:
    """The merged adapter's accuracy on every node's test data."""
    model = lora_model()
    load_adapter(model, arrays)
    tests = [node_data(p, "test") for p in range(NUM_NODES)]
    with torch.no_grad():
        right = sum(int((model(x).argmax(1) == y).sum()) for x, y in tests)
    return right / sum(len(y) for _, y in tests)


server_app = ServerApp()
results = []  # the Result of each run of server_app in this process


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    strategy = LoRAMergeStrategy(MODULES, RANK, min_nodes=NUM_NODES)
    log = lambda server_round, arrays: MetricRecord({"accuracy": accuracy(arrays)})  # noqa: E731
    results.append(strategy.start(grid, ArrayRecord(), num_rounds=NUM_ROUNDS, timeout=600, evaluate_fn=log))


if __name__ == "__main__":
    from .server_app import run_simulation_here

    print(f"before: accuracy {accuracy(ArrayRecord()):.3f}", flush=True)
    run_simulation_here(server_app, client_app, NUM_NODES)
    for server_round, metrics in results[-1].evaluate_metrics_serverapp.items():
        print(f"round {server_round}: accuracy {metrics['accuracy']:.3f}")
