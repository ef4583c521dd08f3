"""What a SLURM job knows about its attempts, on both launch paths (submitit and slurm/train.sbatch):
each attempt (one start of the job, `SLURM_RESTART_COUNT`) leaves its events in
`<run.dir>/launch.jsonl`, and one that fails is claimed once and counted either as a crash of the
training (`--max-retries`) or as a failed node (`--max-node-failures`). A node failure is what SLURM
says about the job's nodes, not what the error looked like: a rank that loses a peer sees the same
"Connection reset by peer" whether the peer's code crashed or its node died."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lejepa_scale.logging_setup import configure_logging

log = logging.getLogger(__name__)

EVENTS = "launch.jsonl"
CRASH, NODE_FAILURE = "crash", "node failure"
PEER_LOST = re.compile(
    r"connection (reset|closed|refused)|broken pipe|timed out|socket|rendezvous|store", re.I
)
LOST_PEER_WAIT = 120  # s at most for SLURM to declare a node failed after a rank lost a peer
ENDINGS = {"finished", "failed", "hung", "stopped", "node failure"}  # an attempt's last word


def record(run_dir: Path, event: str, **fields) -> None:
    """Append one event to `<run_dir>/launch.jsonl` (single small appends: safe from several ranks)."""
    line = json.dumps({"event": event, "time": round(time.time(), 3), **fields}) + "\n"
    with open(Path(run_dir) / EVENTS, "a") as f:
        f.write(line)


def read_events(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / EVENTS
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def scontrol(*args: str) -> list[dict[str, str]]:
    """`scontrol show ... -o` as one dict of key=value per record (empty when SLURM does not answer)."""
    try:
        out = subprocess.run(["scontrol", "show", *args, "-o"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.stdout.splitlines() if "=" in line]


def slurmd_timeout() -> int:
    """How long SLURM waits before it declares a silent node DOWN (SlurmdTimeout, default 300 s)."""
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=60).stdout
    match = re.search(r"^SlurmdTimeout\s*=\s*(\d+)", out, re.M)
    return int(match.group(1)) if match else 300


def failed_nodes(job_id: str) -> dict[str, str]:
    """This attempt's nodes that SLURM sees failed, with why: down or not responding, or a slurmd
    that started after the job did (the node rebooted before SLURM noticed it was gone)."""
    (job,) = scontrol("job", job_id) or [{}]
    started = job.get("StartTime", "")
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or job.get("NodeList", "")  # a requeued job has none
    if not nodelist or nodelist == "(null)":
        return {}
    failed = {}
    for node in scontrol("node", nodelist):
        state = node.get("State", "")
        if any(flag in state for flag in ("DOWN", "NOT_RESPONDING", "FAIL", "*")):
            failed[node["NodeName"]] = f"state {state}"
        elif node.get("SlurmdStartTime", "") > started:  # ISO times compare as strings
            failed[node["NodeName"]] = (
                f"slurmd restarted at {node['SlurmdStartTime']} (job started {started})"
            )
    return failed


@dataclass
class Limits:
    """How often a job is requeued: after crashes and hangs of the training, after node failures."""

    retries: int = 3
    node_failures: int = 20


@dataclass
class Attempt:
    """One start of a SLURM job writing to `run_dir`."""

    run_dir: Path
    job_id: str
    restart: int

    @classmethod
    def from_env(cls, run_dir: Path, job_id: str | None = None) -> Attempt:
        job_id = job_id or os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID", "")
        return cls(Path(run_dir), job_id, int(os.environ.get("SLURM_RESTART_COUNT", 0)))

    def record(self, event: str, **fields) -> None:
        record(self.run_dir, event, job_id=self.job_id, restart=self.restart, **fields)

    def ended(self) -> bool:
        """Whether this attempt's end is recorded (finished, stopped, failed, ...)."""
        ours = [e for e in read_events(self.run_dir) if e.get("job_id") == self.job_id]
        return any(e.get("restart") == self.restart and e["event"] in ENDINGS for e in ours)

    def begin(self, **fields) -> None:
        """Record this start; a previous attempt that ended without a word from the job was ended by
        SLURM (its processes killed when a node failed or was cut off): record it as a node failure."""
        ours = [e for e in read_events(self.run_dir) if e.get("job_id") == self.job_id]
        starts = [e for e in ours if e["event"] == "start"]
        before = Attempt(self.run_dir, self.job_id, starts[-1]["restart"]) if starts else None
        if before and not before.ended() and before.claim(NODE_FAILURE, "ended by SLURM") is not None:
            reason = "SLURM ended and requeued the job with no word from the trainers (a node lost)"
            before.record(NODE_FAILURE, reason=reason, nodes={})
        self.record("start", num_nodes=int(os.environ.get("SLURM_JOB_NUM_NODES", 1)), **fields)

    def claim(self, kind: str, details: str) -> int | None:
        """The first to report a failure of this attempt claims it (an exclusively created file), so
        it is counted once: returns how many of the job's attempts failed this way, or None when
        this one was claimed already."""
        failures = self.run_dir / "launch" / "failures"
        failures.mkdir(parents=True, exist_ok=True)
        try:
            with open(failures / f"{self.job_id}-{self.restart}.txt", "x") as f:
                f.write(f"{kind}\n{details}")
        except FileExistsError:
            return None
        return self.count(kind)

    def count(self, kind: str) -> int:
        """How many of the job's attempts were claimed as `kind` (CRASH or NODE_FAILURE)."""
        claims = (self.run_dir / "launch" / "failures").glob(f"{self.job_id}-*.txt")
        return sum(p.read_text().split("\n", 1)[0] == kind for p in claims)

    def claimed(self) -> str | None:
        """How this attempt failed, if someone claimed it."""
        path = self.run_dir / "launch" / "failures" / f"{self.job_id}-{self.restart}.txt"
        return path.read_text().split("\n", 1)[0] if path.exists() else None

    def note(self, kind: str, details: str) -> None:
        """A trainer's word on how this attempt ends ("hung", "error"), for the batch script that
        decides what happens next (slurm/train.sbatch: torchrun only reports exit code 1)."""
        notes = self.run_dir / "launch" / "notes"
        notes.mkdir(parents=True, exist_ok=True)
        with open(notes / f"{self.job_id}-{self.restart}.{kind}", "a") as f:
            f.write(details + "\n")

    def notes(self) -> dict[str, str]:
        notes = self.run_dir / "launch" / "notes"
        return {p.suffix[1:]: p.read_text() for p in notes.glob(f"{self.job_id}-{self.restart}.*")}

    def out_of_node_failures(self, limits: Limits) -> bool:
        """More node failures than --max-node-failures: record that the job stops here (SLURM
        requeues a job after a node failure by itself, so the limit is enforced at the next start)."""
        used = self.count(NODE_FAILURE)
        if used <= limits.node_failures:
            return False
        reason = f"{used} node failures, more than --max-node-failures {limits.node_failures}"
        if self.claim(CRASH, reason) is not None:
            self.record("failed", reason=reason, requeued=False)
        return True

    def failed(self, reason: str, lost_peer: bool, limits: Limits, event: str = "failed") -> bool:
        """This attempt failed with `reason`: count it as a node failure when SLURM sees one of the
        job's nodes failed, else as a crash; record it and requeue within the limit of its kind.
        When a peer on another node was lost, SLURM gets up to SlurmdTimeout (at most
        LOST_PEER_WAIT) to declare a node, unless the peer claims the attempt meanwhile. Returns
        whether this call requeued the job."""
        several_nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", 1)) > 1  # else the peer ran beside us
        wait = min(slurmd_timeout() + 10, LOST_PEER_WAIT) if lost_peer and several_nodes else 0
        deadline = time.monotonic() + wait
        while not (failed := failed_nodes(self.job_id)) and time.monotonic() < deadline:
            if self.claimed():
                return False
            time.sleep(2)
        if self.superseded():  # SLURM ended this attempt itself (a node it declared down) and requeued
            self.requeued_by_slurm(f"SLURM requeued the job; here: {reason}", failed, limits)
            return False
        kind = NODE_FAILURE if failed else CRASH
        used = self.claim(kind, reason)
        if used is None:
            return False
        limit, option = (
            (limits.node_failures, "--max-node-failures") if failed else (limits.retries, "--max-retries")
        )
        requeue = used <= limit
        details = {"nodes": failed} if failed else {}
        event = NODE_FAILURE if failed else event
        self.record(event, reason=reason, retries=used, limit=limit, requeued=requeue, **details)
        if requeue:
            log.error("%s %d/%d (%s), requeueing: %s", kind, used, limit, option, reason)
            self.requeue()
        else:
            log.error("giving up: %s %d, more than %s %d: %s", kind, used, option, limit, reason)
        return requeue

    def requeued_by_slurm(self, reason: str, failed: dict[str, str], limits: Limits) -> None:
        """Record a node failure that SLURM handled itself (it requeues the job)."""
        if (used := self.claim(NODE_FAILURE, reason)) is not None:
            self.record(NODE_FAILURE, reason=reason, nodes=failed, retries=used, limit=limits.node_failures,
                        requeued=True)  # fmt: skip

    def superseded(self) -> bool:
        """Whether SLURM has requeued the job since this attempt started (a node failure it noticed):
        the rank of an attempt that a partition cut off learns it only when the link is back."""
        (job,) = scontrol("job", self.job_id) or [{}]
        restarts = int(job.get("Restarts", self.restart))
        return restarts > self.restart or job.get("JobState") in ("PENDING", "REQUEUED")

    def requeue(self) -> None:
        subprocess.run(["scontrol", "requeue", self.job_id], timeout=60)


def lost_peer(error: BaseException | str) -> bool:
    """Whether a failure looks like another rank went away (a collective's connection broke)."""
    import torch.distributed as dist

    return isinstance(error, dist.DistError) or bool(PEER_LOST.search(str(error)))


def after_step(attempt: Attempt, code: int, limits: Limits) -> int:
    """The batch script's last word once the trainers' srun step has ended with `code`: when no
    trainer said why (srun killed them after losing a node, SIGKILL), count and requeue it here,
    since SLURM would end the job as FAILED. Returns the batch script's exit code."""
    if code == 0 or attempt.ended() or attempt.claimed():
        return code
    reason = f"the trainers' step ended with exit code {code} and no word from them"
    return 0 if attempt.failed(reason, lost_peer=True, limits=limits) else code


def main(argv: list[str] | None = None) -> None:
    """`python -m lejepa_scale.cluster.attempts RUN_DIR EXIT_CODE MAX_RETRIES MAX_NODE_FAILURES`: the line
    after srun in the batch script the launcher submits."""
    configure_logging()
    run_dir, code, retries, node_failures = (sys.argv[1:] if argv is None else argv)[:4]
    sys.exit(after_step(Attempt.from_env(Path(run_dir)), int(code), Limits(int(retries), int(node_failures))))


if __name__ == "__main__":
    main()
