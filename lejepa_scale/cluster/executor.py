"""The submitit side of `python -m lejepa_scale.launch`: the SLURM executor with the project's batch
script additions (the node preflight, the network interface, the line after srun that counts a lost
node), the `--time` and `--nodes` formats, and the sbatch text a dry run prints."""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import tempfile
from pathlib import Path

import submitit

from lejepa_scale.config import Config, ConfigError


def parse_time(text: str) -> int:
    """SLURM's time formats (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in minutes."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise ConfigError(f"--time {text!r}: use a SLURM time such as 72:00:00 or 3-00:00:00")
    days, a, b, c = (int(x) if x else None for x in match.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        minutes = days * 1440 + a * 60 + (b or 0) + (c or 0) / 60
    elif c is not None:  # HH:MM:SS
        minutes = a * 60 + b + c / 60
    else:  # MM[:SS]
        minutes = a + (b or 0) / 60
    return max(1, round(minutes))


def node_range(text: str) -> tuple[int, int]:
    """`--nodes N` or `--nodes MIN-MAX` (SLURM's syntax) as (min, max)."""
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", str(text).strip())
    if not match or int(match.group(1)) < 1 or (match.group(2) and int(match.group(2)) < int(match.group(1))):
        raise ConfigError(f"--nodes {text!r}: give a count (16) or a range (12-16)")
    return int(match.group(1)), int(match.group(2) or match.group(1))


class LaunchExecutor(submitit.SlurmExecutor):
    """submitit's executor, whose batch script gets one line after its srun: when the step ended
    with no word from the trainers (srun killed them all on losing a node), `slurm_job` counts and
    requeues it instead of leaving the job FAILED."""

    after_step: str = ""
    tasks_per_node: int = 1

    def _make_submission_file_text(self, command: str, uid: str) -> str:
        return super()._make_submission_file_text(command, uid) + self.after_step

    def _num_tasks(self) -> int:
        """The most tasks the job can have: `--nodes MIN-MAX` reaches submitit as SLURM's string."""
        return node_range(self.parameters.get("nodes", 1))[1] * self.tasks_per_node


class SbatchPreview(LaunchExecutor):
    """A LaunchExecutor that is only asked for its sbatch text, so it needs no SLURM on this machine
    (a dry run on a laptop or a CI box)."""

    @classmethod
    def affinity(cls) -> int:
        return 1


def slurm_executor(
    args: argparse.Namespace,
    cfg: Config,
    folder: Path,
    kind: type[LaunchExecutor] = LaunchExecutor,
) -> LaunchExecutor:
    executor = kind(folder=folder, max_num_timeout=args.max_timeouts)
    limits, python = f"{args.max_retries} {args.max_node_failures}", shlex.quote(sys.executable)
    executor.after_step = (
        "\n# lejepa_scale: a step that ended with no word from its trainers (a node lost) is requeued here\n"
        f"{python} -m lejepa_scale.cluster.attempts {shlex.quote(cfg.run.dir)} $? {limits}\n"
    )
    # A node range must leave the task count open: with --ntasks-per-node in the header SLURM fixes
    # the tasks at submission (MIN x tasks per node) and so allocates MIN nodes. The header asks each
    # node for the CPUs of its tasks instead, and srun starts the tasks on every node the job got.
    low, high = node_range(args.nodes)
    per_node = {"ntasks_per_node": args.tasks_per_node} if low == high else {
        "srun_args": [f"--ntasks-per-node={args.tasks_per_node}"]}  # fmt: skip
    extra = {} if low == high else {"mincpus": args.tasks_per_node * args.cpus_per_task}
    executor.tasks_per_node = args.tasks_per_node
    executor.update_parameters(
        job_name=cfg.run.name,
        nodes=args.nodes,
        **per_node,
        gpus_per_node=args.gpus_per_node or None,
        cpus_per_task=args.cpus_per_task,
        mem=f"{args.mem_gb}GB" if args.mem_gb is not None else None,
        time=parse_time(args.time),
        signal_delay_s=args.signal_delay,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        constraint=args.constraint,
        exclude=args.exclude,
        additional_parameters={"requeue": True, "open-mode": "append", **extra},
        setup=[
            # srun does not inherit --cpus-per-task from the allocation since Slurm 22.05
            'if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi',
            # one trivial task per node, retried while a node cannot start tasks yet, once per restart
            # so that the trainers' step id is new (lejepa_scale/cluster/preflight.py)
            f"{python} -m lejepa_scale.cluster.preflight",
            *(
                f"export {name}={value}"
                for name, value in network_environment(args.network_interface).items()
            ),
        ],
    )
    return executor


def network_environment(interface: str | None) -> dict[str, str]:
    """The network interface gloo (CPU training, checkpoints, control) and NCCL use between nodes;
    on nodes with several interfaces they may otherwise pick one the other nodes cannot reach."""
    return {"GLOO_SOCKET_IFNAME": interface, "NCCL_SOCKET_IFNAME": interface} if interface else {}


def sbatch_script(args: argparse.Namespace, cfg: Config, folder: Path) -> str:
    """The sbatch file submitit would write, without touching the run dir or needing SLURM, with
    what each task runs spelled out above it (submitit's `_submit` line unpickles the job)."""
    with tempfile.TemporaryDirectory() as scratch:
        executor = slurm_executor(args, cfg, Path(scratch), SbatchPreview)
        text = executor._make_submission_file_text(executor._submitit_command_str, "dry-run")
    shebang, rest = text.replace(scratch, str(folder)).split("\n", 1)
    training = " ".join(["python -m lejepa_scale.train", *(["--config", args.config] if args.config else []),
                         *args.overrides])  # fmt: skip
    about = [
        "# lejepa_scale: each task runs the equivalent of",
        f"#   {training}",
        f"# on the resolved config (stored in the job, written to {cfg.run.dir}/config.yaml), joining",
        "# the process group from SLURM's environment; submitit's _submit line below runs it.",
    ]
    return "\n".join([shebang, *about, rest])
