"""End to end: a tiny run of every strategy learns, its folder holds what it should, an interrupted run resumes
to the same results, and bad configurations stop before any work with a clear message."""

from __future__ import annotations

import hashlib
import json
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import lorm_ext
from lorm_ext.fcil import cli
from lorm_ext.fcil.config import STRATEGIES, ConfigError
from lorm_ext.fcil.driver import round_test_sets, run, task_test_sets
from lorm_ext.fcil.environment import CPU_ENVIRONMENT, NATIVE_KERNELS, code_record, missing_cpu_environment
from lorm_ext.fcil.metrics import comparison_table, summarize, wins_table
from lorm_ext.fcil.protocol import units

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_tiny_run_learns_and_writes_its_folder(tmp_path, tiny_config, tiny_data, digits_weights, strategy):
    config = tiny_config(strategy=strategy, pretrained_path=digits_weights, num_comm_rounds=2)
    results = run(config, tiny_data(config), str(tmp_path))
    # 2 tasks of 2 digits, 3 clients, 2 rounds (after one, FedIT's and LoRA-FAIR's averages of seed 0 are still at
    # chance). Chance: 50 % after task 1 (2 classes), 25 % after task 2 (4) and so 37.5 % on average;
    # class-incremental forgetting keeps the final accuracy itself near chance.
    assert results["accuracy_matrix"][0][0] > 70
    assert results["summary"]["average_incremental_accuracy"] > 45
    assert results["accuracy_matrix"][0][1] is None and len(results["accuracy_after_task"]) == 2
    assert results["bytes_per_round"]["up"] > 0
    assert (results["bytes_per_round"]["task_end_up"] > 0) == (strategy == "lorm")
    assert (results["seconds"]["gram_s"] > 0) == (strategy == "lorm")  # only LoRM's clients collect Grams
    files = set(os.listdir(tmp_path))
    assert files == {"config.json", "results.json", "rounds.jsonl", "accuracy_matrix.png", "adapters.safetensors"}
    with open(tmp_path / "rounds.jsonl") as log:
        records = [json.loads(line) for line in log]
    assert [(r["task"], r["round"]) for r in records] == [(t, "end" if r is None else r) for t, r in units(config, 2)]
    adapters = load_file(str(tmp_path / "adapters.safetensors"))
    assert {"head/weight", "task1/B/blocks.0.attn.qkv", "delta/blocks.3.mlp.fc2"} <= set(adapters)
    assert run(config, tiny_data(config), str(tmp_path)) == results  # a finished run is reused


def test_round_sample_is_fixed_by_the_seed(tiny_config, tiny_data):
    task_tests = task_test_sets(tiny_data(tiny_config()).splits)
    sample = round_test_sets(tiny_config(round_eval_samples=7), task_tests)
    for drawn, whole in zip(sample, task_tests):
        assert len(drawn) == len(set(drawn)) == 7 and np.all(np.diff(drawn) > 0) and set(drawn) <= set(whole)
    same_seed = round_test_sets(tiny_config(strategy="fedit", round_eval_samples=7), task_tests)
    assert all(np.array_equal(a, b) for a, b in zip(sample, same_seed))
    other_seed = round_test_sets(tiny_config(seed=1, round_eval_samples=7), task_tests)
    assert not np.array_equal(sample[0], other_seed[0])
    assert round_test_sets(tiny_config(round_eval_samples=-1), task_tests) is task_tests
    larger = round_test_sets(tiny_config(round_eval_samples=10**6), task_tests)
    assert [len(t) for t in larger] == [len(t) for t in task_tests]


def _untimed(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.endswith("_s") and k != "seconds"}


def test_rounds_evaluate_the_sample_and_task_ends_every_test_sample(tmp_path, tiny_config, tiny_data):
    task_tests = task_test_sets(tiny_data(tiny_config()).splits)
    results, ends, adapters = {}, {}, {}
    for n in (7, -1):
        config = tiny_config(strategy="fedit", round_eval_samples=n)
        results[n] = _stable(run(config, tiny_data(config), str(tmp_path / str(n))))
        records = [json.loads(line) for line in (tmp_path / str(n) / "rounds.jsonl").read_text().splitlines()]
        round_tests = round_test_sets(config, task_tests)
        for record in records:
            tests = task_tests if record["round"] == "end" else round_tests
            assert record["test_samples"] == [len(t) for t in tests[: record["task"] + 1]]
        assert any(record["test_samples"][0] == 7 for record in records) == (n == 7)
        ends[n] = [_untimed(r) for r in records if r["round"] == "end"]
        adapters[n] = load_file(str(tmp_path / str(n) / "adapters.safetensors"))
    # the sample changes only what the round lines report: training, the task ends and the results are the same
    assert ends[7] == ends[-1]
    unconfigured = [{k: v for k, v in results[n].items() if k != "config"} for n in (7, -1)]
    assert unconfigured[0] == unconfigured[1]
    assert adapters[7].keys() == adapters[-1].keys()
    assert all(adapters[7][k].equal(adapters[-1][k]) for k in adapters[-1])


def test_run_folder_refuses_another_configuration(tmp_path, tiny_config, tiny_data):
    config = tiny_config(strategy="fedit")
    run(config, tiny_data(config), str(tmp_path))
    with pytest.raises(ConfigError, match=r"another configuration \(differs in \['lr'\]\)"):
        run(tiny_config(strategy="fedit", lr=0.1), tiny_data(config), str(tmp_path))


def _cli(output_dir: str) -> list[str]:
    return [sys.executable, "-m", "lorm_ext.fcil.cli", "--strategies", "lorm", "--pretrained", "False",
            "--n_tasks", "5", "--num_clients", "2", "--num_comm_rounds", "1", "--num_epochs", "1",
            "--batch_size", "64", "--prereduce", "True", "--output_dir", output_dir]  # fmt: skip


def _stable(results: dict) -> dict:
    """Everything but timings."""
    return {k: v for k, v in results.items() if k not in ("seconds", "summary")} | {
        "summary": {k: v for k, v in results["summary"].items() if k != "seconds"}
    }


def test_runs_in_parallel_processes_give_the_same_results(tmp_path):
    env = os.environ | {"PYTHONPATH": ROOT}
    results = {}
    for jobs in ("1", "2"):
        flags = [*_cli(str(tmp_path / jobs)), "--strategies", "lorm,fedit", "--jobs", jobs]
        done = subprocess.run(flags, check=False, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "| lorm | 1 |" in done.stdout and "| fedit | 1 |" in done.stdout
        results[jobs] = {
            s: _stable(json.loads((tmp_path / jobs / s / "seed0" / "results.json").read_text()))
            for s in ("lorm", "fedit")
        }
    assert results["1"] == results["2"]  # environment included: one thread in every run


def test_interrupted_run_resumes_to_identical_results(tmp_path):
    env = os.environ | {"PYTHONPATH": ROOT}
    reference = subprocess.Popen(
        _cli(str(tmp_path / "reference")), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    interrupted = subprocess.Popen(
        _cli(str(tmp_path / "resumed")), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    log = tmp_path / "resumed" / "lorm" / "seed0" / "rounds.jsonl"
    deadline = time.time() + 900  # a bound for a busy machine (the pinned CPU kernels are slower), not a timing
    while not (log.exists() and len(log.read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.02)
    assert log.exists() and len(log.read_text().splitlines()) >= 3, "the run to interrupt did not reach unit 3"
    interrupted.send_signal(signal.SIGKILL)  # mid task 1, after task 0's cross-task sums exist
    assert interrupted.wait() == -signal.SIGKILL
    assert (tmp_path / "resumed" / "lorm" / "seed0" / "checkpoint.pt").exists()
    resumed = subprocess.run(
        _cli(str(tmp_path / "resumed")), check=False, cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "| lorm | 1 |" in resumed.stdout  # the comparison table
    folder = re.escape(str(tmp_path / "resumed" / "lorm" / "seed0"))
    assert re.search(rf"lorm_ext\.fcil\.driver: resuming {folder}: [1-9] of 10 units done\n", resumed.stderr)
    assert reference.wait() == 0, reference.stderr.read()
    folders = [tmp_path / name / "lorm" / "seed0" for name in ("reference", "resumed")]
    results = [json.loads((folder / "results.json").read_text()) for folder in folders]
    assert _stable(results[0]) == _stable(results[1])
    records = [[{k: r[k] for k in ("task", "round", "accuracy", "task_accuracies", "bytes_up")} for r in map(json.loads, (f / "rounds.jsonl").read_text().splitlines())] for f in folders]  # fmt: skip
    assert records[0] == records[1] and len(records[0]) == 10
    adapters = [load_file(str(folder / "adapters.safetensors")) for folder in folders]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(adapters[0][k].equal(adapters[1][k]) for k in adapters[0])
    assert not (folders[1] / "checkpoint.pt").exists()
    # the command line restarted itself with the pinned CPU kernels and says so; the split it used is on disk
    env = results[0]["environment"]
    assert env["variables"] == {k: os.environ.get(k, v) for k, v in CPU_ENVIRONMENT.items()} | {NATIVE_KERNELS: None}
    assert env["threads"] == 1 and env["onednn"] is False and env["backbone_sha256"] is None  # --pretrained False
    assert env["code"] == code_record() and len(env["code"]["source_sha256"]) == 64
    split = tmp_path / "resumed" / "splits" / "seed0.json"
    assert hashlib.sha256(split.read_bytes()).hexdigest() == results[0]["split_sha256"] == results[1]["split_sha256"]


def test_code_record_changes_with_the_sources(tmp_path):
    package = tmp_path / "lorm_ext"
    shutil.copytree(os.path.dirname(lorm_ext.__file__), package, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    load = lambda: runpy.run_path(str(package / "fcil" / "environment.py"))["code_record"]()  # noqa: E731
    before = load()
    assert before["source_sha256"] == code_record()["source_sha256"] and before["git_commit"] is None
    (package / "fcil" / "config.py").write_text((package / "fcil" / "config.py").read_text() + "\n# edited\n")
    assert load()["source_sha256"] != before["source_sha256"]


def test_cpu_settings_keep_what_the_user_set(monkeypatch):
    for name in CPU_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(NATIVE_KERNELS, raising=False)
    assert missing_cpu_environment() == CPU_ENVIRONMENT
    monkeypatch.setenv("MKL_CBWR", "AVX2")
    assert missing_cpu_environment() == {k: v for k, v in CPU_ENVIRONMENT.items() if k != "MKL_CBWR"}
    monkeypatch.setenv(NATIVE_KERNELS, "1")
    assert missing_cpu_environment() == {}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--distribution_alpha", "0"], "Dirichlet β.* must be > 0"),
        (["--distribution_alpha", "-0.5"], "Dirichlet β.* must be > 0"),
        (["--num_clients", "200"], "too few for 200 clients"),
        (["--strategies", "lorm,fedavg"], "unknown strategy 'fedavg'"),
        (["--jobs", "0"], "--jobs must be at least 1, got 0"),
        (["--round_eval_samples", "0"], r"--round_eval_samples must be at least 1 \(or -1: every test sample\), got 0"),
        (["--round_eval_samples", "-2"], r"--round_eval_samples must be at least 1 \(or -1.*got -2"),
        (["--r", "65"], r"--r 65: layer 'blocks.0.attn.qkv': rank 65 exceeds the layer's size \(192 × 64\)"),
        (["--pretrained_path", "/no/such/weights.safetensors"], "no such weights file"),
        (["--network", "vit_nonexistent"], "neither 'digits-vit' nor a timm model"),
        (["--participation_rate", "0.05"], "selects nobody"),
        (["--n_tasks", "3"], "10 classes cannot form 3 tasks"),
        (["--dataset", "cifar100"], "give --data_path"),
        (["--dataset", "cifar100", "--data_path", "/no/such/archive"], "does not exist"),
        (["--train_matrix", "C"], "alt, A or B"),
        (["--alpha_regmean_head", "1.5"], r"in \[0, 1\]"),
        (["--alpha_regmean_backbone", "1.5"], r"alpha_regmean_backbone must be in \[0, 1\] \(or < 0"),
        (["--split_file", "/no/such/split.json"], "--split_file '/no/such/split.json': no such file"),
        (["--seed", "one"], "comma list of integers"),
        (["--device", "tpu"], "cpu or cuda"),
        (["--device", "gpu"], r"--device must be cpu or cuda\[:N\], got 'gpu'$"),
        (["--device", "cuda:x"], r"--device must be cpu or cuda\[:N\], got 'cuda:x'$"),
        pytest.param(
            ["--device", "cuda"],
            "--device cuda: CUDA is not available on this machine$",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present"),
        ),
        (
            ["--device", f"cuda:{torch.cuda.device_count()}"] if torch.cuda.is_available() else ["--device", "cuda:0"],
            f"this machine has {torch.cuda.device_count()} CUDA device"
            if torch.cuda.is_available()
            else "CUDA is not available",
        ),
        (
            ["--strategies", "fedit", "--prereduce", "True"],
            "--prereduce applies to lorm only, which --strategies fedit does not include$",
        ),
        (
            ["--strategies", "lorm,fedit", "--lora_fair_steps", "5"],
            "--lora_fair_steps applies to lora-fair only, which --strategies lorm,fedit does not include$",
        ),
    ],
)
def test_bad_configuration_fails_before_any_work(tmp_path, capsys, flags, message):
    output_dir = tmp_path / "out"
    assert cli.main([*flags, "--pretrained", "False", "--output_dir", str(output_dir)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not output_dir.exists()


def test_help_says_each_default_once(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "default: runs/<dataset>-<network>-beta<β> --overwrite" in text  # not followed by "(default: None)"
    for action in cli.build_parser()._actions:
        if action.help and action.help != "show this help message and exit":
            assert text.count(action.help) == 1
            assert text.split(action.help, 1)[1].lstrip().startswith("(default: ") != ("default" in action.help)


def test_bad_boolean_flag_is_refused(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--pretrained", "Flase"])
    assert "expected True or False" in capsys.readouterr().err


def test_strategy_specific_flags_do_not_touch_other_strategies():
    args = cli.build_parser().parse_args(
        ["--strategies", "lorm,fedit", "--prereduce", "True", "--alpha_regmean_backbone", "0.3"]
    )
    lorm, fedit = cli.configurations(args)
    assert (lorm.prereduce, lorm.alpha_regmean_backbone) == (True, 0.3)
    assert (fedit.prereduce, fedit.alpha_regmean_backbone) == (False, 0.0)


def test_metrics_on_a_hand_made_run():
    # 3 tasks; task sizes 10, 20, 10 test samples
    total = [10, 20, 10]
    correct = [[9, 0, 0], [6, 18, 0], [5, 10, 8]]
    summary = summarize(correct, total)
    assert summary["final_accuracy_weighted"] == pytest.approx(100 * 23 / 40)
    assert summary["final_accuracy_task_mean"] == pytest.approx((50 + 50 + 80) / 3)
    assert summary["average_incremental_accuracy"] == pytest.approx((90 + 100 * 24 / 30 + 100 * 23 / 40) / 3)
    assert summary["forgetting_last"] == pytest.approx(((90 - 50) + (90 - 50)) / 2)
    correct[1][0] = 10  # task 0 improves after task 1: the max definition sees it
    summary = summarize(correct, total)
    assert summary["forgetting_last"] == pytest.approx(((90 - 50) + (90 - 50)) / 2)
    assert summary["forgetting_max"] == pytest.approx(((100 - 50) + (90 - 50)) / 2)
    table = comparison_table({"lorm": [{"summary": summary | {"kib_up_per_round": 1.0, "seconds": 2.0}}] * 2})
    assert "| lorm | 2 | 57.50 ± 0.00 |" in table
    one = comparison_table({"lorm": [{"summary": summary | {"kib_up_per_round": 1.0, "seconds": 2.0}}]})
    assert one.splitlines()[2] == "| lorm | 1 | 57.50 | 60.00 | 80.28 | 40.00 | 45.00 | 1.0 | 2 |"  # no spread


def test_wins_table_counts_seeds_where_lorm_is_ahead():
    def runs(finals, incrementals, seeds=(0, 1, 2)):
        return [
            {"seed": s, "summary": {"final_accuracy_weighted": f, "average_incremental_accuracy": i}}
            for s, f, i in zip(seeds, finals, incrementals)
        ]

    results = {
        "lorm": runs([50.0, 40.0, 30.0], [60.0, 61.0, 62.0]),
        "fedit": runs([45.0, 40.0, 35.0], [50.0, 50.0, 50.0]),
        "centralized": runs([20.0, 90.0], [70.0, 70.0], seeds=(2, 7)),  # only seed 2 is shared
    }
    lines = wins_table(results).splitlines()
    assert lines[2] == "| fedit | 3 | 1/1/1 | +0.00 ± 5.00 | 3/0/0 | +11.00 ± 1.00 |"
    assert lines[3] == "| centralized | 1 | 1/0/0 | +10.00 | 0/0/1 | -8.00 |"  # one seed: no spread
    assert wins_table({"fedit": results["fedit"]}) == ""


def _figures(monkeypatch) -> list:
    """The figures lorm_ext.fcil.plots draws, kept when it closes them."""
    from lorm_ext.fcil import plots

    figures, close = [], plots.plt.close
    monkeypatch.setattr(plots.plt, "close", lambda fig: (figures.append(fig), close(fig)))
    return figures


def _finished(seed: int) -> dict:
    correct, total = [[9, 0], [6, 18]], [10, 20]
    return {"seed": seed, "config": {"dataset": "mnist", "network": "digits-vit", "distribution_alpha": 0.5},
            "summary": summarize(correct, total) | {"kib_up_per_round": 1.0, "seconds": 2.0},
            "accuracy_after_task": [90.0, 80.0], "accuracy_matrix": [[90.0, None], [60.0, 90.0]],
            "environment": {}}  # fmt: skip


@pytest.mark.parametrize("seeds", [[0], [0, 1]])
def test_the_accuracy_matrices_have_a_colour_bar_and_say_what_they_average(tmp_path, monkeypatch, seeds):
    figures = _figures(monkeypatch)
    cli.write_comparison(str(tmp_path), {s: [_finished(seed) for seed in seeds] for s in ("lorm", "fedit")})
    matrices = next(f for f in figures if f._suptitle is not None and "accuracy matrices" in f._suptitle.get_text())
    assert len(matrices.axes) == 3 and matrices.axes[-1].get_ylabel() == "accuracy (%)"  # two heatmaps, one bar
    title = matrices._suptitle.get_text()
    assert ("mean over seeds" in title) == (len(seeds) > 1), title
    assert (tmp_path / "accuracy_matrices.png").stat().st_size > 0
