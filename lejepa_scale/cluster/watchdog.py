"""A trainer that stops making progress says where it is stuck and exits, instead of holding every
node until the job's time limit: a peer froze or died mid-collective, a link is down and gloo waits,
a data worker deadlocked. Host-side only (a thread and a clock): no device sync per step."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

EXIT_HUNG = 4  # no step completed for train.hang_timeout seconds: requeue and resume
PACKAGES = ("lejepa_scale", "data_pipeline")


class HangWatchdog:
    """A context around the loop: call `beat(step)` after every completed step. When none comes for
    `timeout` seconds of the process running (a suspended job's pause does not count), the watchdog
    logs the last completed step and where the main thread waits (the collective in flight, if any),
    runs `on_hang` (e.g. ask SLURM for a requeue) and exits with EXIT_HUNG. `timeout` <= 0 turns it
    off."""

    def __init__(self, timeout: float, on_hang: Callable[[str], None] | None = None):
        self.timeout, self.on_hang = timeout, on_hang
        self.step: int | None = None
        self.last = time.monotonic()
        self._loop = threading.get_ident()  # the thread that runs the training loop
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
        if timeout > 0:
            self._thread.start()

    def beat(self, step: int) -> None:
        self.step, self.last = step, time.monotonic()

    def __enter__(self) -> HangWatchdog:
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def _watch(self) -> None:
        """Every `interval` s. A wake-up more than an interval late means the whole process was stopped
        (`scontrol suspend`, gang scheduling, SIGSTOP): that time is not the loop's, and is not counted."""
        interval = min(5.0, self.timeout / 4)
        woke = time.monotonic()
        while not self._stop.wait(interval):
            now = time.monotonic()
            if now - woke > 2 * interval:
                self.last += now - woke - interval
            woke = now
            if now - self.last > self.timeout:
                self._hung()

    def _hung(self) -> None:
        frames = traceback.extract_stack(sys._current_frames()[self._loop])
        where = waiting_in(frames)
        reason = (
            f"no training step completed for {time.monotonic() - self.last:.0f} s (train.hang_timeout="
            f"{self.timeout:g}); last completed step: {self.step}; the training loop waits in {where}"
        )
        log.error("%s\n%s", reason, "".join(traceback.format_list(frames[-8:])).rstrip())
        for handler in logging.getLogger().handlers:
            handler.flush()
        try:
            if self.on_hang is not None:
                self.on_hang(reason)
        finally:
            os._exit(EXIT_HUNG)


def slow_step_seconds(flops_per_step: float, peak_tflops: float, state_bytes: float) -> float:
    """A pessimistic step plus a blocking save, what `train.hang_timeout` must stay well above:
    5 % MFU, and this rank's checkpoint share written at 100 MB/s."""
    return flops_per_step / (0.05 * peak_tflops * 1e12) + state_bytes / 100e6


def timeout_too_short(timeout: float, slow_step: float) -> str | None:
    """A warning when the watchdog could fire on a slow but healthy step (less than 3 of them)."""
    if 0 < timeout < 3 * slow_step:
        return (f"train.hang_timeout={timeout:g} s is less than 3 slow steps of this model ({slow_step:.0f} "
                f"s each at 5 % MFU, with a blocking save): a healthy job could be stopped as hung; raise it "
                f"to {3 * slow_step:.0f} s or more")  # fmt: skip
    return None


def waiting_in(frames: traceback.StackSummary) -> str:
    """The collective in flight (the innermost torch.distributed call on the stack) and the project
    line that issued it; else the innermost project line."""
    ours = [f for f in frames if any(f"{os.sep}{pkg}{os.sep}" in f.filename for pkg in PACKAGES)]
    caller = "?"
    if ours:  # the path from the package down, e.g. lejepa_scale/distributed/collectives.py
        parts = Path(ours[-1].filename).parts
        top = max(i for i, part in enumerate(parts) if part in PACKAGES)
        caller = f"{'/'.join(parts[top:])}:{ours[-1].lineno}"
    collectives = [f for f in frames if f.filename.endswith("distributed_c10d.py")]
    if collectives:
        return f"torch.distributed.{collectives[-1].name} (called from {caller})"
    return caller
