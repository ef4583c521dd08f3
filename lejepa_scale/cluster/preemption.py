"""Preemption: SLURM's signals become a flag (the ranks agree on it at their next control step),
and the exit code that asks for a requeue."""

from __future__ import annotations

import signal

EXIT_PREEMPTED = 3  # the trainer saved and stopped on SIGTERM/SIGUSR1/SIGUSR2: requeue and resume


class Preempted(Exception):
    """Raised after the preemption checkpoint is complete; the entry point exits EXIT_PREEMPTED, and
    the SLURM launcher requeues when `signum` is its preemption signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class PreemptionFlag:
    """SIGTERM, SIGUSR1 and SIGUSR2 (what SLURM sends before preemption or the time limit) only set
    a flag; the trainer reads it at its control steps, all ranks together."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self):
        self.received: int | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum
