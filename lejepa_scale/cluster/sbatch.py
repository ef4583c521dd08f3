"""`python -m lejepa_scale.cluster.sbatch CONFIG [key=value ...]`: the body of slurm/train.sbatch,
in the batch step on the job's first node. It runs one torchrun per node with srun and decides, like
the submitit path, what happens when that ends: finished; stopped by USR2 (time limit) or by the
trainers' own preemption save → requeue; a hang or a crash → requeue within --max-retries; a failed
node → requeue within --max-node-failures; each recorded in `<run.dir>/launch.jsonl`. A step whose
task ended while another node no longer answers (crashed and rebooted before SLURM noticed) is
cancelled instead of waited on until the time limit."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from lejepa_scale.checkpointing.checkpoint import newest_step
from lejepa_scale.cluster.attempts import Attempt, Limits, failed_nodes
from lejepa_scale.cluster.preemption import EXIT_PREEMPTED
from lejepa_scale.cluster.preflight import nodes_ready
from lejepa_scale.config import ConfigError, load_config
from lejepa_scale.logging_setup import configure_logging

log = logging.getLogger("lejepa_scale.cluster.sbatch")

TASK_ENDED = re.compile(r"^srun: .*(task \d+: \w+|Terminating StepId=(\d+\.\d+))")
STEP_GRACE = 30  # s after a task ended for srun to end the step (it signals the others; KillWait)


class Step:
    """srun running the trainers, its output relayed, and a watch for a task that ended while the
    step did not."""

    def __init__(self, command: list[str]):
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, errors="replace")
        self.task_ended: float | None = None
        self.step_id = f"{os.environ.get('SLURM_JOB_ID')}.0"
        threading.Thread(target=self._relay, daemon=True).start()

    def _relay(self) -> None:
        for line in self.process.stderr:
            sys.stderr.write(line)
            match = TASK_ENDED.match(line)
            if match:
                self.task_ended = self.task_ended or time.monotonic()
                self.step_id = match.group(2) or self.step_id

    def wait(self, on_sigterm: Callable[[], None], received: list[int], all_saved: Callable[[], bool]) -> int:
        """srun's exit code; `on_sigterm` runs once, as soon as SIGTERM is among `received`. Once
        every trainer has saved and stopped (`all_saved`), EXIT_PREEMPTED without waiting for
        torchrun and srun to wind down (seconds on every preemption)."""
        cancelled = told = False
        while True:
            if all_saved() and signal.SIGTERM not in received:
                return EXIT_PREEMPTED
            if signal.SIGTERM in received and not told:
                on_sigterm()
                told = True
            if self.process.poll() is not None:
                return self.process.returncode
            if self.task_ended and time.monotonic() - self.task_ended > STEP_GRACE and not cancelled:
                log.error("a task ended %d s ago, step %s did not: cancelling it", STEP_GRACE, self.step_id)
                subprocess.run(["scancel", self.step_id], timeout=60)
                cancelled = True
            time.sleep(1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m lejepa_scale.cluster.sbatch", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--nproc-per-node", type=int, default=int(os.environ.get("NPROC_PER_NODE", 0))
                   or int(os.environ.get("SLURM_GPUS_ON_NODE", 0) or 1))  # fmt: skip
    p.add_argument("--max-retries", type=int, default=int(os.environ.get("MAX_RETRIES", 3)))
    p.add_argument("--max-node-failures", type=int, default=int(os.environ.get("MAX_NODE_FAILURES", 20)))
    args = p.parse_args(argv)
    configure_logging()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    run_dir, nodes = Path(cfg.run.dir).resolve(), int(os.environ["SLURM_NNODES"])
    run_dir.mkdir(parents=True, exist_ok=True)
    attempt, limits = Attempt.from_env(run_dir), Limits(args.max_retries, args.max_node_failures)
    attempt.begin(world_size=nodes * args.nproc_per_node, resume_step=newest_step(run_dir), path="sbatch",
                  nodes=os.environ.get("SLURM_JOB_NODELIST"),
                  network_interface=os.environ.get("GLOO_SOCKET_IFNAME"))  # fmt: skip
    if attempt.out_of_node_failures(limits):
        sys.exit(1)
    if not nodes_ready(nodes, attempt.restart):
        attempt.failed("a node could not start a task", lost_peer=True, limits=limits)
        sys.exit(1)

    head = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                          capture_output=True, text=True, check=True).stdout.split()[0]  # fmt: skip
    port = 20000 + int(os.environ["SLURM_JOB_ID"]) % 20000
    # srun does not inherit --cpus-per-task from the allocation since Slurm 22.05: pass it on
    command = ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1",
               f"--cpus-per-task={os.environ.get('SLURM_CPUS_PER_TASK', 1)}",
               sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes),
               "--nproc-per-node", str(args.nproc_per_node), "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"{head}:{port}", "--rdzv-id", os.environ["SLURM_JOB_ID"],
               "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2",
               "--shutdown-timeout", "600",
               "-m", "lejepa_scale.train", "--config", args.config, *args.overrides]  # fmt: skip
    log.info("job %s (restart %d): %d node(s) x %d, rendezvous %s:%d", attempt.job_id, attempt.restart, nodes,
             args.nproc_per_node, head, port)  # fmt: skip
    received: list[int] = []
    step = Step(command)

    def forward(signum, frame):
        received.append(signum)
        if signum == signal.SIGUSR2:  # the time limit (B:USR2): the trainers save, then we requeue
            log.warning("USR2: the trainers checkpoint, then the job requeues")
            step.process.send_signal(signum)

    signal.signal(signal.SIGUSR2, forward)
    signal.signal(signal.SIGTERM, forward)  # scancel, a requeue, a preemption: SLURM signals the step too

    def all_saved() -> bool:  # every trainer noted its preemption checkpoint
        return len(attempt.notes().get("stopped", "").splitlines()) >= nodes * args.nproc_per_node

    code = step.wait(lambda: terminated(attempt, limits), received, all_saved)
    sys.exit(code if signal.SIGTERM in received else decide(attempt, limits, code, received))


def terminated(attempt: Attempt, limits: Limits) -> None:
    """SIGTERM to the batch step: scancel, or SLURM requeues the job (a preemption, a `scontrol
    requeue`, a node it declared down). SLURM decides what comes next; recorded at once, since
    SIGKILL follows KillWait later and the step may not end before."""
    failed = failed_nodes(attempt.job_id)
    if failed:
        attempt.requeued_by_slurm("SLURM ended the job: a node failed", failed, limits)
    else:
        attempt.record("stopped", signal="SIGTERM", step=newest_step(attempt.run_dir))


def decide(attempt: Attempt, limits: Limits, code: int, received: list[int]) -> int:
    """What the job does after the trainers' step ended with `code`; the batch script's exit code."""
    notes = {kind: text.strip().splitlines()[0] for kind, text in attempt.notes().items()}  # rank 0's, say
    if code == 0:
        attempt.record("finished", step=newest_step(attempt.run_dir))
        return 0
    if signal.SIGUSR2 in received or "stopped" in notes:
        signame = "SIGUSR2" if signal.SIGUSR2 in received else notes["stopped"].split()[0]
        attempt.record("stopped", signal=signame, step=newest_step(attempt.run_dir), requeued=True)
        log.warning("requeueing job %s", attempt.job_id)
        attempt.requeue()
        return 0
    if "hung" in notes:
        requeued = attempt.failed(notes["hung"], lost_peer=False, limits=limits, event="hung")
    elif "error" in notes:
        requeued = attempt.failed(notes["error"], lost_peer=False, limits=limits)
    else:  # no trainer said why: a lost peer, a dead node or a task killed from outside
        requeued = attempt.failed(
            f"the trainers' step ended with exit code {code}", lost_peer=True, limits=limits
        )
    return 0 if requeued else code


if __name__ == "__main__":
    main()
