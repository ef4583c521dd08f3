"""SLURM: the sbatch body, the attempts ledger (launch.jsonl, retries, node failures), preemption,
the hang watchdog, the node preflight, the submitit executor and the status of a run."""
