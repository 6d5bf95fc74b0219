"""A training run's signals to the outside world: a per-rank progress file, and stop requests.

``<output_dir>/progress/rank_N.json`` is rewritten after every step (step, total, pid, time) for
monitors and the fault-injection tests. SIGTERM/SIGINT ask the loop to stop after the current step,
so a checkpoint and a partial report are written; a second SIGINT interrupts at once.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from trait_guard.files import atomic_write_text


class ProgressFile:
    """``<out_dir>/progress/rank_N.json`` after every step."""

    def __init__(self, out_dir: Path, rank: int, total_steps: int):
        self.path = Path(out_dir) / "progress" / f"rank_{rank}.json"
        self.total_steps, self.pid = total_steps, os.getpid()

    def write(self, step: int) -> None:
        atomic_write_text(self.path, json.dumps({"step": step, "total_steps": self.total_steps, "pid": self.pid,
                                                 "time": time.time()}))


class StopRequest:
    """Turns SIGTERM/SIGINT into "stop after this step" (only in the main thread, where handlers can
    be installed); :meth:`restore` puts the previous handlers back."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def install(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
