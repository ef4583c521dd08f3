"""One trivial task per node before the trainers, on both launch paths: a node that cannot start
tasks yet (a slurmd still registering, a credential revoked late) is retried here, not found out by
the trainers. Once per restart: step ids start at 0 again when SLURM restarts a job, and a signal
SLURM still retries for the previous start's step N would stop this start's step N; so the
trainers' step gets id restart + 1, which no earlier start used.

A restart's first probe also lasts CLEANUP_PROBE_S: a node that comes back with the previous
start's step still on it (its tasks blocked when it was cut off) is told by the controller to abort
that start, and its slurmd then kills every step of the job there, from 2 s on and once a second,
until none is left: the new start's steps included, and srun never hears of it (an aborted step
sends no exit), so the trainers on the other nodes would wait for the killed one for good. A probe
that lives through the cleanup's window finds a node clean; one it kills fails and is retried after
the pause, in which the cleanup finds no step and ends.

`python -m lejepa_scale.cluster.preflight` is the submitit batch script's line before its srun;
slurm/train.sbatch's body calls `nodes_ready` itself."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

from lejepa_scale.logging_setup import configure_logging

log = logging.getLogger(__name__)

TRIES = 3
CLEANUP_PROBE_S = 4  # a node's cleanup of an aborted start kills the job's steps from 2 s on


def nodes_ready(nodes: int, restart: int) -> bool:
    """Whether every one of the job's `nodes` ran a task, `restart` + 1 times (10 s between tries)."""
    srun = ["srun", f"--nodes={nodes}", "--ntasks-per-node=1", "--cpus-per-task=1"]
    for probe in range(restart + 1):
        command = [*srun, "sleep", str(CLEANUP_PROBE_S)] if restart and probe == 0 else [*srun, "true"]
        tries = 0
        while subprocess.run(command).returncode != 0:
            tries += 1
            log.warning("a node could not start or keep a task (try %d/%d)", tries, TRIES)
            if tries == TRIES:
                return False
            time.sleep(10)
    return True


def main() -> None:
    configure_logging()
    ready = nodes_ready(int(os.environ["SLURM_NNODES"]), int(os.environ.get("SLURM_RESTART_COUNT", 0)))
    sys.exit(0 if ready else 1)


if __name__ == "__main__":
    main()
