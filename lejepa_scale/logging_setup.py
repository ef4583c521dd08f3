"""The console log format of every entry point (train, launch and its jobs, the sbatch body, the
line after srun, evaluate, demo)."""

from __future__ import annotations

import logging


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
