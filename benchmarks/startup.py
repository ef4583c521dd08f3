"""Start-up time of the trainer, fresh vs resumed, on 2 gloo ranks with a ViT-B/16 (86 M
parameters + projector; the checkpoint holds its AdamW state too).

PYTHONPATH=. python benchmarks/startup.py

Each run is `torchrun --nproc_per_node 2 -m lejepa_scale.train` with the schema's defaults,
`model.name=vit_base_patch16_224`, 32 px views of scikit-learn's digits, fp32, one step. Reported:
process start to ready-to-step (fresh: the model is built; resume: the checkpoint is loaded) and
the model construction the trainer times itself: a fresh start builds the full model on rank 0
and broadcasts it, a resume from a complete checkpoint only allocates the shards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path.cwd()
MODEL = ["model.name=vit_base_patch16_224", "views.global_size=32", "views.local_size=16",
         "data.source=digits", "train.batch_size=8", "train.precision=fp32", "loss.num_slices=64",
         "log.wandb=disabled", "checkpoint.every_steps=0"]  # fmt: skip


def time_to_first_step(run_dir: str, steps: int, ready_when: str) -> tuple[float, float]:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command = [*torchrun, "-m", "lejepa_scale.train", f"run.dir={run_dir}", f"train.steps={steps}", *MODEL]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    ready = build = None
    for line in proc.stderr:
        if ready is None and ready_when in line:
            ready = time.perf_counter() - start
        if "model initialised in" in line or "model allocated for a checkpoint in" in line:
            build = float(line.rsplit(" in ", 1)[1].split()[0])
    if proc.wait() != 0 or ready is None:
        raise RuntimeError(f"the run in {run_dir} failed")
    return ready, build


def main() -> None:
    with tempfile.TemporaryDirectory() as run_dir:
        fresh = time_to_first_step(run_dir, 1, "rank(s) on")  # logged once the model is built
        resumed = time_to_first_step(run_dir, 2, "resumed from")
    print("| start | process start to ready | of which model construction |")
    print("|---|---|---|")
    print(f"| fresh (rank 0 builds and broadcasts the model) | {fresh[0]:.1f} s | {fresh[1]:.2f} s |")
    print(f"| resume from a complete checkpoint (load included) | {resumed[0]:.1f} s | {resumed[1]:.2f} s |")


if __name__ == "__main__":
    main()
