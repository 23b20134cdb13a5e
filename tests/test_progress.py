"""Progress where no terminal shows a bar: log lines with units done, rate and time left, at most every interval;
the command lines show them and print each distinct warning once."""

from __future__ import annotations

import io
import logging
import sys
import warnings

import pytest

from lorm_ext.progress import Progress, configure_cli_logging

LOGGER = logging.getLogger("lorm_ext.test_progress")


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def log(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER.name)
    return caplog


def test_lines_say_units_done_rate_and_time_left(log):
    clock = Clock()
    with Progress(4, "lorm seed 0", "unit", LOGGER, interval=0, clock=clock) as progress:
        assert progress.bar.disable  # pytest's stderr is not a terminal
        clock.now += 10
        progress.update("task 1, acc 90.0")
        clock.now += 30
        progress.update()
    assert log.messages == [
        "lorm seed 0: 1/4 units, 0.1 unit/s, ETA 0:00:30, task 1, acc 90.0",
        "lorm seed 0: 2/4 units, 0.05 unit/s, ETA 0:00:40",
    ]


def test_a_resumed_loop_counts_its_rate_from_its_own_units(log):
    clock = Clock()
    progress = Progress(30, "run", "unit", LOGGER, initial=10, interval=0, clock=clock)
    clock.now += 2 * 3600
    progress.update()  # 1 unit in 2 h: 19 left take 38 h
    assert log.messages == ["run: 11/30 units, 0.000139 unit/s, ETA 38:00:00"]


def test_lines_come_at_most_every_interval_and_when_the_loop_ends(log):
    clock = Clock()
    progress = Progress(5, "round 1", "client", LOGGER, interval=30, clock=clock)
    for step in (10, 10, 15, 1, 1):  # at 10, 20, 35, 36, 37 s
        clock.now += step
        progress.update()
    assert [line.split(",")[0] for line in log.messages] == ["round 1: 3/5 clients", "round 1: 5/5 clients"]
    assert log.messages[-1].endswith("ETA 0:00:00")


def test_an_inner_loop_logs_no_final_line(log):
    clock = Clock()
    progress = Progress(2, "round 1", "client", LOGGER, leave=False, interval=30, clock=clock)
    progress.update()
    progress.update()
    assert log.messages == []


def test_the_command_lines_log_to_stderr_as_it_is_at_each_line(monkeypatch):
    log = logging.getLogger("lorm_ext")
    handlers = list(log.handlers)
    first, second = io.StringIO(), io.StringIO()
    try:
        monkeypatch.setattr(sys, "stderr", first)
        configure_cli_logging()
        LOGGER.info("one")
        monkeypatch.setattr(sys, "stderr", second)  # as pytest's capture does between tests
        first.close()
        LOGGER.info("two")
        assert second.getvalue().endswith("lorm_ext.test_progress: two\n")
    finally:
        for handler in set(log.handlers) - set(handlers):
            log.removeHandler(handler)


def test_the_command_lines_print_each_warning_once():
    log = logging.getLogger("lorm_ext")
    handlers = list(log.handlers)
    try:
        with warnings.catch_warnings(record=True) as caught:
            configure_cli_logging()
            for _ in range(3):
                warnings.warn("padding rows in the batch", UserWarning, stacklevel=1)
        assert [str(w.message) for w in caught] == ["padding rows in the batch"]
        assert log.level == logging.INFO and len(log.handlers) == max(1, len(handlers))
    finally:
        for handler in set(log.handlers) - set(handlers):
            log.removeHandler(handler)
