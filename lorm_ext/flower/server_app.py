"""The FCIL ServerApp body (``serve``), the whole protocol in Flower's simulation engine (``simulate``) and any app
pair there (``run_simulation_here``)."""

from __future__ import annotations

import os

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

from ..fcil.config import RunConfig
from ..fcil.driver import check, evaluate_seen, prepare, unit_test_sets
from ..fcil.metrics import seen_accuracy
from ..fcil.model import build_model
from .client_app import app as client_app
from .fcil_strategy import LoRMStrategy


def serve(grid: Grid, config: RunConfig, *, timeout: float = 3600.0) -> Result:
    """What a ServerApp's main does for one FCIL run: the data and model as the driver builds them, a
    ``LoRMStrategy`` over the grid's nodes, and after every round and task end the driver's evaluation (accuracy
    over all classes seen so far, on the test data of the tasks seen so far, as ``driver.unit_test_sets`` picks
    them). timeout: seconds to wait for the nodes, and for each round's replies."""
    torch.set_num_threads(config.num_threads)
    data = prepare(config)
    dataset = data.dataset
    model = build_model(config, dataset.num_classes, data.weights)
    task_classes = [dataset.class_range(t) for t in range(dataset.n_tasks)]
    strategy = LoRMStrategy(config, model.layer_shapes, task_classes)
    tests = unit_test_sets(config, data.splits)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        task, round_ = strategy.instruction.task, strategy.instruction.round  # a task end's round: num_comm_rounds
        unit_tests = tests[round_ == config.num_comm_rounds]
        _, correct = evaluate_seen(model, arrays.to_torch_state_dict(), dataset, unit_tests, task + 1)
        evaluated = [len(t) for t in unit_tests]
        return MetricRecord({"task": task, "round": round_, "accuracy": seen_accuracy(correct, evaluated, task + 1)})

    head = ArrayRecord({f"head/{k}": v.detach() for k, v in model.head_parameters().items()})
    return strategy.start(grid, head, timeout=timeout, evaluate_fn=evaluate)


def simulate(config: RunConfig, *, timeout: float = 3600.0) -> Result:
    """The FCIL protocol in Flower's simulation engine: ``config.num_clients`` virtual nodes run the ClientApp
    in Ray actors of ``config.num_threads`` CPUs each (a whole GPU each when ``config.device`` is CUDA); returns
    ``serve``'s result (``run_simulation_here``)."""
    check(config)  # a bad configuration fails before Ray starts
    results: list[Result] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        results.append(serve(grid, config, timeout=timeout))

    gpus = 1.0 if config.device.startswith("cuda") else 0.0
    run_simulation_here(
        server_app, client_app, config.num_clients, cpus_per_node=config.num_threads, gpus_per_node=gpus
    )
    return results[0]


def run_simulation_here(
    server_app: ServerApp, client_app: ClientApp, num_nodes: int, *, cpus_per_node: int = 1, gpus_per_node: float = 0.0
) -> None:
    """Any ServerApp / ClientApp pair in Flower's simulation engine on this machine alone: ``num_nodes`` virtual
    nodes in Ray actors of ``cpus_per_node`` CPUs (and ``gpus_per_node`` GPUs) each. Ray is shut down before it
    returns or raises.

    Ray's processes address each other on 127.0.0.1 and send no usage statistics, unless the environment says
    otherwise (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``, ``RAY_USAGE_STATS_ENABLED``): Ray reads these when it is
    first imported, which is here unless the process imported it before."""
    # "no cluster": Ray takes the loopback address as the node's address instead of the machine's
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray  # after the environment above
    from flwr.simulation import run_simulation

    backend_config = {
        "client_resources": {"num_cpus": cpus_per_node, "num_gpus": gpus_per_node},
        "init_args": {"num_cpus": os.cpu_count(), "include_dashboard": False},
    }
    try:
        run_simulation(server_app, client_app, num_supernodes=num_nodes, backend_config=backend_config)
    finally:
        if ray.is_initialized():  # Flower shuts Ray down itself unless the simulation failed on the way
            ray.shutdown()
