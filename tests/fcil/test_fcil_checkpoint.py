"""Resuming: from a checkpoint that is corrupt or tampered with, one line naming the file, the problem and how to
start over, and nothing in the run folder changes; an intact one says how far the run got; a finished run made
by other code or on another machine is reused only with --resume."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re

import numpy as np
import pytest
import torch
from lorm_testing import RunsCode, with_nan

from lorm_ext.fcil import cli, driver
from lorm_ext.fcil.config import ConfigError
from lorm_ext.fcil.data import split_tasks
from lorm_ext.fcil.driver import CHECKPOINT, RunData, run

UNITS_DONE = 3  # of 4 (2 tasks × (1 round + the task end)): task 0 is finished, the cross-task sums exist
QKV = "blocks.0.attn.qkv"


class _Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, tiny_config, four_digits):
    """(config, data, run folder) of a LoRM run stopped after UNITS_DONE units, as if killed."""
    config = tiny_config(strategy="lorm")
    data = RunData(four_digits, split_tasks(four_digits, config), weights=None)
    run_dir = tmp_path_factory.mktemp("interrupted")
    evaluate, calls = driver.evaluate_seen, []

    def evaluate_then_stop(*args):
        calls.append(None)
        if len(calls) > UNITS_DONE:
            raise _Interrupt
        return evaluate(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(driver, "evaluate_seen", evaluate_then_stop)
        with pytest.raises(_Interrupt):
            run(config, data, str(run_dir))
    return config, data, run_dir


def _tampered(change):
    """Bytes of the checkpoint with ``change(state)`` applied to its loaded state."""

    def tamper(blob: bytes, path) -> bytes:
        state = torch.load(path, weights_only=True)
        change(state)
        torch.save(state, path)
        return path.read_bytes()

    return tamper


def _set(mapping_path: list, value):
    def change(state):
        node = state
        for key in mapping_path[:-1]:
            node = node[key]
        node[mapping_path[-1]] = value(node[mapping_path[-1]]) if callable(value) else value

    return change


CORRUPT = {  # kind: (bytes of the checkpoint -> bytes, what the message says)
    "truncated": (lambda blob, path: blob[: len(blob) // 2], "not a readable checkpoint (RuntimeError"),
    "empty": (lambda blob, path: b"", "not a readable checkpoint ("),
    "random bytes": (
        lambda blob, path: np.random.default_rng(0).bytes(4096),
        "not a readable checkpoint (UnpicklingError",
    ),
    "code in a pickle": (
        lambda blob, path: pickle.dumps({"next_unit": RunsCode(os.system, f"touch {path.parent / 'ran'}")}),
        "not a readable checkpoint (UnpicklingError: Weights only load failed",
    ),
    "next_unit a string": (_tampered(_set(["next_unit"], "3")), "next_unit '3' is not in [1, 4]"),
    "next_unit past the plan": (_tampered(_set(["next_unit"], 9)), "next_unit 9 is not in [1, 4]"),
    "a record lost": (_tampered(_set(["records"], lambda r: r[:-1])), "records must be a list of the 3 completed"),
    "records reordered": (_tampered(_set(["records"], lambda r: r[::-1])), "record 0 is not that of task 0 round 0"),
    "a record without seconds": (
        _tampered(_set(["records", 2], lambda r: {k: v for k, v in r.items() if k != "seconds"})),
        "record 2 lacks one of the numbers",
    ),
    "correct counts": (_tampered(_set(["correct", 0], [10**6, 0])), "correct[0] must be 2 counts of right test"),
    "a key missing": (
        _tampered(lambda s: s.pop("correct")),
        "expected a dict with the keys ['correct', 'next_unit', 'records', 'server'], got ['next_unit', 'records',",
    ),
    "server at another stage": (_tampered(_set(["server", "task"], 0)), "the server state is not that after unit 2"),
    "head shape": (
        _tampered(_set(["server", "current", "head/weight"], lambda t: t[:-1])),
        "server state: current 'head/weight' must be torch.float32 (4, 64), got torch.float32 (3, 64)",
    ),
    "factor NaN": (
        _tampered(_set(["server", "current", f"A/{QKV}"], lambda t: with_nan(t, 2))),
        f"server state: layer 'A/{QKV}': current tensor contains NaN or Inf (1 entries)",
    ),
    "factor float64": (
        _tampered(_set(["server", "current", f"B/{QKV}"], lambda t: t.double())),
        f"server state: current 'B/{QKV}' must be torch.float32",
    ),
    "a task adapter missing": (
        _tampered(lambda s: s["server"]["task_adapters"].pop(f"task0/B/{QKV}")),
        f"server state: task_adapters: layer names differ from the expected ones: missing ['task0/B/{QKV}']",
    ),
    "cross-task sum broadcast": (
        _tampered(_set(["server", "across_tasks", "sums", f"{QKV}.numerator"], lambda t: t[:1])),
        f"across_tasks must hold an (out, in) sum for every layer of this run once a task finished, none before "
        f"(1 finished); layer '{QKV}' does not fit",
    ),
    "cross-task sum NaN": (
        _tampered(_set(["server", "across_tasks", "sums", f"{QKV}.denominator"], lambda t: with_nan(t, 2))),
        f"server state: across_tasks: load_state_dict: layer '{QKV}': denominator contains NaN or Inf",
    ),
    "cross-task client count": (
        _tampered(_set(["server", "across_tasks", "num_clients"], 0)),
        "server state: across_tasks: load_state_dict: num_clients is 0 but the sums hold",
    ),
}


def _copy(folder, tmp_path):
    """A copy of the interrupted run's folder, for one test to change."""
    copy = tmp_path / "run"
    copy.mkdir()
    for name in os.listdir(folder):
        (copy / name).write_bytes((folder / name).read_bytes())
    return copy


@pytest.mark.parametrize("kind", CORRUPT)
def test_a_corrupt_checkpoint_is_one_line_naming_the_file_and_how_to_start_over(interrupted, tmp_path, kind):
    config, data, folder = interrupted
    run_dir = _copy(folder, tmp_path)
    path = run_dir / CHECKPOINT
    corrupt, problem = CORRUPT[kind]
    path.write_bytes(corrupt(path.read_bytes(), path))
    before = {name: (run_dir / name).read_bytes() for name in os.listdir(run_dir)}
    with pytest.raises(ConfigError) as error:
        run(config, data, str(run_dir))
    message = str(error.value)
    assert message.startswith(f"{path}: cannot resume from this checkpoint: ")
    assert problem in message
    assert message.endswith(
        ". Delete it to start this run over from its first round, or pass --overwrite True to discard the whole "
        "run folder"
    )
    assert "\n" not in message
    assert {name: (run_dir / name).read_bytes() for name in os.listdir(run_dir)} == before  # the folder as it was
    assert not (run_dir / "ran").exists()


def test_the_intact_checkpoint_still_resumes(interrupted, tmp_path, caplog):
    config, data, folder = interrupted
    run_dir = _copy(folder, tmp_path)
    with caplog.at_level(logging.INFO, logger="lorm_ext"):
        results = run(config, data, str(run_dir))
    assert len(results["accuracy_after_task"]) == 2 and not (run_dir / CHECKPOINT).exists()
    assert caplog.messages[0] == f"resuming {run_dir}: {UNITS_DONE} of 4 units done"
    # no terminal here: the progress of the run is a log line (the last unit's, as the run ends)
    last = caplog.messages[-1]
    assert re.fullmatch(r"lorm seed 0: 4/4 units, [0-9.e+-]+ unit/s, ETA 0:00:00, task 2, acc [0-9.]+", last), last


@pytest.fixture(scope="module")
def finished(interrupted, tmp_path_factory):
    """(config, data, run folder) of the interrupted run, finished."""
    config, data, folder = interrupted
    run_dir = _copy(folder, tmp_path_factory.mktemp("finished"))
    run(config, data, str(run_dir))
    return config, data, run_dir


def _made_elsewhere(finished, tmp_path, change) -> tuple:
    """A copy of the finished run whose results.json says ``change(environment)`` made it; (config, data, folder)."""
    config, data, folder = finished
    output_dir = tmp_path / "out"
    (output_dir / config.strategy).mkdir(parents=True)
    run_dir = _copy(folder, output_dir / config.strategy)
    run_dir.rename(output_dir / config.strategy / f"seed{config.seed}")
    run_dir = output_dir / config.strategy / f"seed{config.seed}"
    results = json.loads((run_dir / driver.RESULTS).read_text())
    change(results["environment"])
    (run_dir / driver.RESULTS).write_text(json.dumps(results))
    return config, data, run_dir


def _other_code(environment):
    environment["code"]["source_sha256"] = "0" * 64


def _no_code(environment):
    del environment["code"]


def _other_cpu(environment):
    environment["cpu_model"] = "Other CPU"


def _other_switch(environment):
    environment["variables"]["MKL_CBWR"] = "AVX2"  # a branch nobody here picks


def _same(environment):
    pass


ELSEWHERE = {
    _other_code: r"by other code \(sources sha256 000000000000…, here [0-9a-f]{12}…\)",
    _no_code: "by code whose version it does not record",
    _other_cpu: r"with cpu_model 'Other CPU' \(here '[^']*'\)",
    _other_switch: r"with variables \{.*'MKL_CBWR': 'AVX2'.*\} \(here \{.*\}\)",
}


@pytest.mark.parametrize("change", list(ELSEWHERE), ids=lambda f: f.__name__)
def test_a_finished_run_made_elsewhere_is_reused_only_with_resume(finished, tmp_path, caplog, change):
    config, data, run_dir = _made_elsewhere(finished, tmp_path, change)
    before = {name: (run_dir / name).read_bytes() for name in os.listdir(run_dir)}
    with pytest.raises(ConfigError) as refused:
        run(config, data, str(run_dir))
    assert re.fullmatch(
        rf"{re.escape(str(run_dir))} holds a finished run made {ELSEWHERE[change]}: pass --resume True to reuse its "
        r"results, --overwrite True to run it again, or choose another --output_dir",
        str(refused.value),
    ), refused.value
    with caplog.at_level(logging.INFO, logger="lorm_ext"):
        results = run(config, data, str(run_dir), resume=True)
    assert results == json.loads(before[driver.RESULTS])
    assert caplog.messages[0] == f"resuming {run_dir}: 4 of 4 units done (finished: its results are reused)"
    assert caplog.messages[1].startswith(f"{run_dir}: reusing (--resume) a run made ")
    assert {name: (run_dir / name).read_bytes() for name in os.listdir(run_dir)} == before  # nothing ran


def test_a_finished_run_made_here_is_reused_saying_so(finished, tmp_path, caplog):
    config, data, run_dir = _made_elsewhere(finished, tmp_path, _same)
    with caplog.at_level(logging.INFO, logger="lorm_ext"):
        run(config, data, str(run_dir))
    assert caplog.messages == [f"resuming {run_dir}: 4 of 4 units done (finished: its results are reused)"]


def _flags(config, output_dir) -> list[str]:
    flags = ["--strategies", config.strategy, "--seed", str(config.seed), "--output_dir", str(output_dir)]
    defaults = driver.RunConfig()
    for key, value in config.to_json().items():
        if key not in ("strategy", "seed") and value != getattr(defaults, key):
            flags += [f"--{key}", str(value)]
    return flags


def test_the_command_line_stops_before_any_work_at_a_finished_run_made_elsewhere(finished, tmp_path, capsys):
    config, _, run_dir = _made_elsewhere(finished, tmp_path, _other_code)
    flags = _flags(config, tmp_path / "out")
    assert cli.configurations(cli.build_parser().parse_args(flags)) == [config]
    assert cli.main(flags) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lorm-fcil: error: {run_dir} holds a finished run made by other code")
    assert err.count("\n") == 1
    assert not (tmp_path / "out" / "splits").exists()  # stopped before the data and the split
    assert cli.main([*flags, "--resume", "True", "--overwrite", "True"]) == 2
    assert "--overwrite True discards the runs that --resume True would reuse" in capsys.readouterr().err
    assert (run_dir / driver.RESULTS).exists()


def test_the_command_line_prints_the_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", torch.backends.mkldnn.enabled)  # the CLI pins it
    threads = torch.get_num_threads()
    flags = ["--strategies", "lorm", "--pretrained", "False", "--n_tasks", "5", "--num_clients", "2",
             "--num_comm_rounds", "1", "--output_dir", str(tmp_path)]  # fmt: skip
    config = cli.configurations(cli.build_parser().parse_args(flags))[0]
    run_dir = tmp_path / "lorm" / "seed0"
    run_dir.mkdir(parents=True)
    driver._write_json(str(run_dir / driver.CONFIG), config.to_json())
    (run_dir / CHECKPOINT).write_bytes(b"")
    try:
        assert cli.main(flags) == 2
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err.strip()
    path = re.escape(str(run_dir / CHECKPOINT))
    assert re.fullmatch(rf"lorm-fcil: error: {path}: cannot resume from this checkpoint: .* whole run folder", err)


@pytest.mark.parametrize("kind", ["truncated", "empty", "random bytes", "a tensor of another shape"])
def test_an_unreadable_backbone_weights_file_is_one_line_naming_it(tmp_path, tiny_config, kind):
    from safetensors.torch import load_file, save_file

    from lorm_ext.fcil.model import EMBEDDED_WEIGHTS, build_model

    path = tmp_path / "weights.safetensors"
    blob = open(EMBEDDED_WEIGHTS, "rb").read()
    if kind == "a tensor of another shape":
        weights = load_file(EMBEDDED_WEIGHTS)
        weights["blocks.0.attn.qkv.weight"] = weights["blocks.0.attn.qkv.weight"][:-1]
        save_file(weights, str(path))
    else:
        path.write_bytes({"truncated": blob[: len(blob) // 2], "empty": b"", "random bytes": os.urandom(512)}[kind])
    config = tiny_config(pretrained=True, pretrained_path=str(path))
    with pytest.raises(ConfigError) as error:
        build_model(config, 4, str(path))
    message = str(error.value)
    assert message.startswith(f"{path}: cannot load vit_tiny_patch16_224 weights from it (")
    assert message.endswith(
        "pass a readable timm checkpoint of this network with --pretrained_path, or --pretrained False"
    )
    assert "\n" not in message
