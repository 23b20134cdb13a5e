"""Progress of long loops where a user can see it: a tqdm bar on a terminal, log lines everywhere else.

tqdm turns its bar off when stderr is not a terminal (``make run > log``, a batch job); a loop would then be
silent for as long as it runs. ``Progress`` logs instead, at most every ``LOG_INTERVAL_S`` seconds and when the
loop ends: units done, the rate and the time left. The command lines show lorm_ext's INFO lines on stderr
(``configure_cli_logging``); as a library lorm_ext leaves logging to the application.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Callable

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """``total`` units of work: ``update()`` after each. ``initial`` units were done before (a resumed run): the
    rate and the time left count only this process's units. ``leave=False``: an inner loop, whose bar goes away
    at the end and which logs no final line."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str,
        logger: logging.Logger,
        *,
        initial: int = 0,
        leave: bool = True,
        interval: float = LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.desc, self.unit, self.logger, self.leave = total, desc, unit, logger, leave
        self.done = self.initial = initial
        self.interval, self.clock = interval, clock
        self.start = self.last_line = clock()
        self.postfix = ""
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, disable=None)

    def update(self, postfix: str = "") -> None:
        """One more unit done; ``postfix`` (e.g. "task 2, acc 71.5") goes on the bar or the line."""
        self.done += 1
        self.postfix = postfix
        if not self.bar.disable:
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update()
        elif self.clock() - self.last_line >= self.interval or (self.leave and self.done == self.total):
            self.last_line = self.clock()
            self.logger.info("%s", self.line())

    def line(self) -> str:
        """ "<desc>: k/n <unit>s, r <unit>/s, ETA h:mm:ss[, postfix]" (ETA from this process's rate)."""
        elapsed = self.clock() - self.start
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        left = self.total - self.done
        eta = _duration(left / rate) if rate > 0 else "?" if left else _duration(0)
        text = f"{self.desc}: {self.done}/{self.total} {self.unit}s, {rate:.3g} {self.unit}/s, ETA {eta}"
        return f"{text}, {self.postfix}" if self.postfix else text

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each line, not to the stream of the moment it was made (which a caller
    that swaps stderr, such as pytest's capture, may have closed since)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def configure_cli_logging() -> None:
    """For the command lines: lorm_ext's INFO lines (progress, resuming) on stderr with a time stamp, and each
    distinct warning printed once rather than at every batch (unless the user chose with -W / PYTHONWARNINGS)."""
    log = logging.getLogger("lorm_ext")
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    if not sys.warnoptions:
        warnings.simplefilter("once")
