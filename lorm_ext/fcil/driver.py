"""The FCIL loop: tasks, rounds, clients simulated one after another in one process on one shared model.

A run is a sequence of units: per task, ``num_comm_rounds`` rounds and one task end. After every unit the
server's model is evaluated on the test data of all tasks seen so far (over all classes seen so far: after a
task end on all of it, after a round on a fixed sample, ``unit_test_sets``), a line goes to ``rounds.jsonl``
and the whole state is checkpointed atomically, so a run interrupted at any point
resumes from its last completed unit with identical results. A finished run folder holds config.json,
results.json, rounds.jsonl, accuracy_matrix.png and adapters.safetensors (every task's B and A, the head and
the final dense update of each adapted layer).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from ..files import atomic_write as _write_atomic
from ..progress import Progress
from .client import client_step, tensor_bytes
from .client import clock as client_clock
from .config import SEED_ROUND_TESTS, ConfigError, RunConfig, derive_seed, validate
from .data import Dataset, InputSpec, TaskSplit, batches, load_dataset, split_tasks, split_to_json
from .environment import machine_record, provenance, provenance_changes
from .metrics import accuracy_matrix, seen_accuracy, summarize
from .model import AdaptedViT, build_model, check_architecture, resolve_weights
from .plots import as_array, plot_accuracy_matrices
from .protocol import close_unit, open_unit, participants, units
from .strategies import SERVERS

EVAL_BATCH_SIZE = 256
CHECKPOINT, RESULTS, CONFIG, LOG = "checkpoint.pt", "results.json", "config.json", "rounds.jsonl"
logger = logging.getLogger(__name__)


@dataclass
class RunData:
    """What every strategy of one seed shares: the data set, its split, the backbone weights file."""

    dataset: Dataset
    splits: list[TaskSplit]
    weights: str | None


@functools.cache
def check(config: RunConfig) -> InputSpec:
    """Every check that needs neither data nor weights; the network's input specification."""
    validate(config)
    return check_architecture(config)


def prepare(config: RunConfig) -> RunData:
    """All checks, then the data and its split and the weights: a bad configuration fails here, before training."""
    dataset = load_dataset(config, check(config))
    return RunData(dataset, split_tasks(dataset, config), resolve_weights(config))


def split_bytes(data: RunData) -> bytes:
    """The run's split in the format of ``--split_file`` (``data.split_to_json``), as the file holds it."""
    return json.dumps(split_to_json(data.dataset, data.splits), separators=(",", ":")).encode()


def _write_json(path: str, data) -> None:
    def write(tmp):
        with open(tmp, "w") as file:
            json.dump(data, file, indent=1)

    _write_atomic(path, write)


def _write_lines(path: str, records: list[dict]) -> None:
    with open(path, "w") as file:
        file.writelines(json.dumps(r) + "\n" for r in records)


def check_run_dir(config: RunConfig, run_dir: str) -> None:
    """A run folder belongs to one configuration: resuming with another one is an error."""
    path = os.path.join(run_dir, CONFIG)
    if os.path.isfile(path):
        with open(path) as file:
            saved = json.load(file)
        if saved != config.to_json():
            changed = sorted(k for k in set(saved) | set(config.to_json()) if saved.get(k) != config.to_json().get(k))
            raise ConfigError(
                f"{run_dir} holds a run with another configuration (differs in {changed}): choose another "
                f"--output_dir or pass --overwrite True"
            )


def finished_results(run_dir: str, resume: bool) -> tuple[dict, list[str]] | None:
    """The results of the finished run in ``run_dir`` and how it was made otherwise than a run here would be
    (``provenance_changes``); None: not finished. A finished run made by other code, or on a machine or with
    kernel switches that give other numbers, stands for a run here only with ``resume``: otherwise a
    ConfigError names the folder, what differs and the choices."""
    path = os.path.join(run_dir, RESULTS)
    if not os.path.isfile(path):
        return None
    with open(path) as file:
        results = json.load(file)
    changes = provenance_changes(provenance(results["environment"]), provenance(machine_record(None)))
    if changes and not resume:
        raise ConfigError(
            f"{run_dir} holds a finished run made {'; '.join(changes)}: pass --resume True to reuse its results, "
            f"--overwrite True to run it again, or choose another --output_dir"
        )
    return results, changes


def task_test_sets(splits: list[TaskSplit]) -> list[np.ndarray]:
    """Per task, the indices of its test samples (all clients'), sorted."""
    return [np.sort(np.concatenate(split.test)) for split in splits]


def unit_test_sets(config: RunConfig, splits: list[TaskSplit]) -> dict[bool, list[np.ndarray]]:
    """Per task, the test samples a unit is evaluated on, keyed by whether the unit is a task end: then every one
    (``task_test_sets``, the accuracy matrix), after a round the fixed sample of ``round_test_sets``."""
    task_tests = task_test_sets(splits)
    return {True: task_tests, False: round_test_sets(config, task_tests)}


def round_test_sets(config: RunConfig, task_tests: list[np.ndarray]) -> list[np.ndarray]:
    """Per task, the test samples evaluated after a round: at most ``config.round_eval_samples`` of
    ``task_tests``, drawn once per task from the run seed (so the same for every strategy of a seed), sorted;
    all of them at -1. The accuracy matrix reads only task ends, which evaluate every test sample."""
    n = config.round_eval_samples
    if n == -1:
        return task_tests
    rngs = [np.random.default_rng(derive_seed(config.seed, SEED_ROUND_TESTS, task)) for task in range(len(task_tests))]
    return [t if len(t) <= n else np.sort(rng.choice(t, n, replace=False)) for t, rng in zip(task_tests, rngs)]


def evaluate_seen(
    model: AdaptedViT, tensors: Mapping[str, Tensor], dataset: Dataset, task_tests: list[np.ndarray], seen: int
) -> tuple[np.ndarray, list[int]]:
    """``correct_predictions`` and, per task seen so far, how many of its test samples are right."""
    hits = correct_predictions(model, tensors, dataset, task_tests, seen)
    return hits, [int(hits[t].sum()) for t in task_tests[:seen]]


@torch.no_grad()
def correct_predictions(
    model: AdaptedViT, tensors: Mapping[str, Tensor], dataset: Dataset, task_tests: list[np.ndarray], seen: int
) -> np.ndarray:
    """Whether the model given as tensors (``Server.model_tensors``: "delta/<layer>", "head/…") classifies each
    test sample of the first ``seen`` tasks right (over all classes seen so far); False elsewhere."""
    model.load({k: v for k, v in tensors.items() if k.startswith("head/")})
    model.vit.eval()
    indices = np.concatenate(task_tests[:seen])
    device = model.head.weight.device
    predictions = []
    deltas = {k.removeprefix("delta/"): v for k, v in tensors.items() if k.startswith("delta/")}
    with model.dense(deltas):
        for x, _ in batches(dataset.test, indices, EVAL_BATCH_SIZE, train=False):
            predictions.append(model.vit(x.to(device))[:, : seen * dataset.classes_per_task].argmax(1).cpu())
    hits = np.zeros(len(dataset.test), dtype=bool)
    hits[indices] = torch.cat(predictions).numpy() == dataset.test.labels[indices]
    return hits


def _no_traffic() -> dict[str, float]:
    return {"train_s": 0.0, "gram_s": 0.0, "merge_s": 0.0, "bytes_up": 0, "bytes_down": 0, "clients": 0}


def _exchange(server, instruction, model, images, shards, config, clock, desc) -> dict[str, float]:
    """One instruction to every client of ``shards``, their messages into the server; time and bytes."""
    stats = _no_traffic() | {"clients": len(shards)}
    progress = Progress(len(shards), desc, "client", logger, leave=False)
    for client_id, indices in shards.items():
        reply = client_step(model, images, indices, instruction, config, client_id)
        stats["train_s"] += reply.seconds["train"]
        stats["gram_s"] += reply.seconds["gram"]
        stats["bytes_up"] += tensor_bytes(reply.message)
        stats["bytes_down"] += tensor_bytes(instruction.tensors)
        start = clock()
        server.receive(reply.message)
        stats["merge_s"] += clock() - start
        progress.update()
    progress.close()
    return stats


def _communicate(config, data, model, server, clock, task: int, round_: int | None):
    """One round (or, round_ None, the task end) of the server with its clients: the instruction and stats."""
    split = data.splits[task]
    if server.pooled:
        shards = {0: np.sort(np.concatenate(split.train))}
    else:
        shards = {k: split.train[k] for k in participants(config, task)}
    instruction = open_unit(server, task, round_, data.dataset.class_range(task))
    stats = _no_traffic()
    if instruction is not None:
        desc = f"{config.strategy} seed {config.seed} task {task + 1} " + (
            "Grams" if round_ is None else f"round {round_ + 1}"
        )
        stats = _exchange(server, instruction, model, data.dataset.train, shards, config, clock, desc)
    merge_start = clock()
    close_unit(server, round_)
    stats["merge_s"] += clock() - merge_start
    return instruction, stats


# what the results and the log read of each checkpointed unit's record, besides "task" and "round"
_RECORD_NUMBERS = ("accuracy", "train_s", "gram_s", "merge_s", "eval_s", "seconds", "bytes_up", "bytes_down", "clients")


def load_checkpoint(path: str, server, plan: list[tuple[int, int | None]], total: list[int]) -> dict:
    """The state saved after the last completed unit, with ``server`` loaded from it; a ConfigError naming the
    file, the problem and how to start over when it cannot be read or is not a state of this run (``plan``:
    its units; ``total``: test samples per task)."""

    def fail(problem: str):
        raise ConfigError(
            f"{path}: cannot resume from this checkpoint: {problem}. Delete it to start this run over from its "
            f"first round, or pass --overwrite True to discard the whole run folder"
        )

    try:
        state = torch.load(path, map_location=server.device, weights_only=True)
    except Exception as error:  # torch.load reports truncated, empty or foreign files with many exception types
        fail(f"not a readable checkpoint ({type(error).__name__}: {str(error).partition(chr(10))[0]})")
    problem = _checkpoint_problem(state, plan, total)
    if problem:
        fail(problem)
    try:
        server.load_state_dict(state["server"])
    except ValueError as error:
        fail(str(error))
    return state


def _checkpoint_problem(state, plan: list[tuple[int, int | None]], total: list[int]) -> str | None:
    """What does not fit this run in a checkpoint's progress (the server's state is checked by the server)."""
    keys = {"next_unit", "records", "correct", "server"}
    if not isinstance(state, dict) or set(state) != keys:
        got = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        return f"expected a dict with the keys {sorted(keys)}, got {got}"
    done = state["next_unit"]
    if type(done) is not int or not 1 <= done <= len(plan):
        return f"next_unit {done!r} is not in [1, {len(plan)}] (the units of this run)"
    records, correct = state["records"], state["correct"]
    if not isinstance(records, list) or len(records) != done:
        return f"records must be a list of the {done} completed units"
    for index, ((task, round_), record) in enumerate(zip(plan, records)):
        unit = (task, "end" if round_ is None else round_)
        if not isinstance(record, dict) or (record.get("task"), record.get("round")) != unit:
            return f"record {index} is not that of task {task} {'end' if round_ is None else f'round {round_}'}"
        if not all(type(record.get(k)) in (int, float) and math.isfinite(record[k]) for k in _RECORD_NUMBERS):
            return f"record {index} lacks one of the numbers {list(_RECORD_NUMBERS)}"
    ends = [task for task, round_ in plan[:done] if round_ is None]
    if not isinstance(correct, list) or len(correct) != len(ends):
        return f"correct must hold one list per finished task ({len(ends)})"
    for task, counts in zip(ends, correct):
        if (
            not isinstance(counts, list)
            or len(counts) != len(total)
            or not all(type(c) is int and 0 <= c <= n for c, n in zip(counts, total))
        ):
            return f"correct[{task}] must be {len(total)} counts of right test samples, each at most the task's"
    server = state["server"]
    task, round_ = plan[done - 1]
    stage = {"task": task, "finished": task + 1 if round_ is None else task}
    if not isinstance(server, dict) or any(server.get(k) != v for k, v in stage.items()):
        return f"the server state is not that after unit {done - 1} of this run ({stage})"
    return None


def run(config: RunConfig, data: RunData, run_dir: str, resume: bool = False) -> dict:
    """One strategy, one seed; resumes from ``run_dir``'s checkpoint, returns (and writes) the results. A
    finished run in ``run_dir`` is reused (``finished_results``: made elsewhere, only with ``resume``)."""
    check_run_dir(config, run_dir)
    plan = units(config, data.dataset.n_tasks)
    finished = finished_results(run_dir, resume)
    if finished is not None:
        results, changes = finished
        logger.info("resuming %s: %d of %d units done (finished: its results are reused)", run_dir, *[len(plan)] * 2)
        if changes:
            logger.warning("%s: reusing (--resume) a run made %s", run_dir, "; ".join(changes))
        return results
    results_path = os.path.join(run_dir, RESULTS)
    os.makedirs(run_dir, exist_ok=True)
    _write_json(os.path.join(run_dir, CONFIG), config.to_json())

    dataset, splits = data.dataset, data.splits
    model = build_model(config, dataset.num_classes, data.weights)
    server = SERVERS[config.strategy](config, model.layer_shapes, model.head_parameters())
    tests = unit_test_sets(config, splits)
    task_tests = tests[True]
    total = [len(t) for t in task_tests]
    checkpoint_path, log_path = os.path.join(run_dir, CHECKPOINT), os.path.join(run_dir, LOG)
    state = {"next_unit": 0, "records": [], "correct": []}
    if os.path.isfile(checkpoint_path):
        state = load_checkpoint(checkpoint_path, server, plan, total)
        logger.info("resuming %s: %d of %d units done", run_dir, state["next_unit"], len(plan))
    # the log holds exactly the checkpointed units (a unit logged but not checkpointed is done again)
    _write_atomic(log_path, lambda tmp: _write_lines(tmp, state["records"]))
    clock = functools.partial(client_clock, model.head.weight.device)

    progress = Progress(len(plan), f"{config.strategy} seed {config.seed}", "unit", logger, initial=state["next_unit"])
    hits = None  # of the last unit run: the final model's, when the run ends with it
    for index in range(state["next_unit"], len(plan)):
        task, round_ = plan[index]
        started = clock()
        instruction, stats = _communicate(config, data, model, server, clock, task, round_)
        eval_start = clock()
        unit_tests = tests[round_ is None]
        evaluated = [len(t) for t in unit_tests[: task + 1]]
        hits, correct = evaluate_seen(model, server.model_tensors(), dataset, unit_tests, task + 1)
        if round_ is None:
            state["correct"].append(correct + [0] * (dataset.n_tasks - task - 1))
        record = {
            "task": task,
            "round": "end" if round_ is None else round_,
            "trained": instruction.train if instruction is not None else "",
            "accuracy": seen_accuracy(correct, evaluated, task + 1),
            "task_accuracies": [100.0 * c / n for c, n in zip(correct, evaluated)],
            "test_samples": evaluated,
            **stats,
            "eval_s": clock() - eval_start,
            "seconds": clock() - started,
        }
        state["records"].append(record)
        with open(log_path, "a") as log:
            log.write(json.dumps(record) + "\n")
        state["next_unit"], state["server"] = index + 1, server.state_dict()
        _write_atomic(checkpoint_path, lambda tmp: torch.save(state, tmp))
        progress.update(f"task {task + 1}, acc {record['accuracy']:.1f}")
    progress.close()

    final = server.model_tensors()
    if hits is None:  # resumed after the last unit: nothing was evaluated in this process
        hits = correct_predictions(model, final, dataset, task_tests, dataset.n_tasks)
    results = _results(config, state, total, hits, data)
    plot_accuracy_matrices(
        {f"{config.strategy}, seed {config.seed}": as_array(results["accuracy_matrix"])},
        os.path.join(run_dir, "accuracy_matrix.png"),
    )
    save_file(
        {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in final.items()},
        os.path.join(run_dir, "adapters.safetensors"),
        metadata={"strategy": config.strategy, "lora_scaling": str(config.lora_scaling), "network": config.network},
    )
    _write_json(results_path, results)  # last: a run folder with results.json is complete
    os.remove(checkpoint_path)
    return results


def _results(config: RunConfig, state: dict, total: list[int], hits: np.ndarray, data: RunData) -> dict:
    splits = data.splits
    records = state["records"]
    rounds = [r for r in records if r["round"] != "end"]
    task_ends = [r for r in records if r["round"] == "end"]
    correct = state["correct"]
    client_tests = [np.concatenate([s.test[k] for s in splits]) for k in range(config.num_clients)]
    per_client = [100.0 * float(np.mean(hits[t])) if len(t) else None for t in client_tests]
    measured = [a for a in per_client if a is not None]
    summary = summarize(correct, total)
    summary["kib_up_per_round"] = float(np.mean([r["bytes_up"] for r in rounds])) / 1024
    summary["seconds"] = float(sum(r["seconds"] for r in records))
    return {
        "strategy": config.strategy,
        "seed": config.seed,
        "config": config.to_json(),
        "summary": summary,
        "accuracy_matrix": accuracy_matrix(correct, total),
        "accuracy_after_task": [r["accuracy"] for r in task_ends],
        "correct": correct,
        "test_samples_per_task": total,
        "split_sha256": hashlib.sha256(split_bytes(data)).hexdigest(),
        "seconds": {k: float(sum(r[k] for r in records)) for k in ("train_s", "gram_s", "merge_s", "eval_s")},
        "bytes_per_round": {
            "up": float(np.mean([r["bytes_up"] for r in rounds])),
            "down": float(np.mean([r["bytes_down"] for r in rounds])),
            "task_end_up": float(np.mean([r["bytes_up"] for r in task_ends])),
        },
        # the final model on each client's own test shard (None: a client without test samples)
        "client_accuracy": {
            "min": min(measured),
            "mean": float(np.mean(measured)),
            "max": max(measured),
            "per_client": per_client,
        },
        "environment": {"device": config.device} | machine_record(data.weights),
    }
