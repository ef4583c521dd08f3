"""The real training loop on GPUs: step time, images/s, MFU and peak memory (next to the planner's
prediction) per activation-checkpointing mode, compile on/off and float8 on/off.

    python benchmarks/gpu_step.py                          # ViT-H/14 and ViT-g/14 recipes, one GPU
    python benchmarks/gpu_step.py --nproc 8                # one node, torchrun --nproc_per_node 8
    python benchmarks/gpu_step.py --smoke                  # the same harness on CPU with a tiny ViT

Each configuration runs `python -m lejepa_scale.train` (torchrun with --nproc > 1) on the recipe
with its per-GPU batch, synthetic in-memory data (scikit-learn's digits cropped to the recipe's
view sizes, so no dataset is needed), `checkpoint.enabled=false`, and `train.sync_debug=true`
(a host sync outside a logging step is an error). Only logging steps read the device, so the loop
runs ahead as in training: the step time is (wall time at log step 2N - at log step N) / N, taken
from metrics.jsonl, after N warm-up steps. MFU uses the planner's model FLOPs and torchtitan's peak
table for the GPU. Prints a markdown table with the device name.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lejepa_scale.config import load_config  # noqa: E402
from lejepa_scale.plan import GiB, make_plan, model_shape  # noqa: E402
from lejepa_scale.training.metrics import peak_tflops  # noqa: E402

RECIPES = {"ViT-H/14": "configs/vit_h14_in1k.yaml", "ViT-g/14": "configs/vit_g14_in1k_16nodes.yaml"}
SMOKE = {"tiny ViT (CPU)": "configs/demo_cpu_vit.yaml"}
SYNTHETIC = ["data.source=digits", "data.train=null", "data.val=null", "checkpoint.enabled=false",
             "log.wandb=disabled", "log.health_every=100000", "parallel.dp_replicate=1",
             "train.sync_debug=true"]  # fmt: skip


def run(recipe: str, overrides: list[str], nproc: int, n: int) -> dict:
    """One configuration: its step time, peak memory and throughput, or why it failed."""
    with tempfile.TemporaryDirectory() as run_dir:
        args = ["--config", str(ROOT / recipe), f"run.dir={run_dir}", f"train.steps={2 * n + 1}",
                f"train.log_every={n}", *SYNTHETIC, *overrides]  # fmt: skip
        launcher = (
            ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
            if nproc > 1
            else []
        )
        command = [sys.executable, *launcher, "-m", "lejepa_scale.train", *args]
        result = subprocess.run(
            command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
        )
        path = Path(run_dir) / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    if result.returncode != 0 or len(records) < 3:
        lines = [line for line in result.stderr.splitlines() if "Error" in line or "error" in line]
        return {"error": (lines[-1] if lines else result.stderr[-200:]).strip()[:120]}
    first, second = records[1], records[2]  # logged at steps n and 2n
    return {"step_s": (second["time"] - first["time"]) / n, "peak_gib": second["peak_mem_gib"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=1, help="GPUs (torchrun --nproc_per_node)")
    parser.add_argument("--ac", default="none,op,selective,full")
    parser.add_argument("--compile", default="off,on")
    parser.add_argument("--float8", default="off,on")
    parser.add_argument("--steps", type=int, default=10, help="N: warm-up steps, then N measured")
    parser.add_argument("--smoke", action="store_true", help="tiny ViT on CPU: checks the harness, not a GPU")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print("no GPU visible: nothing measured (use --smoke to check the harness on CPU)")
        return 0
    recipes = SMOKE if args.smoke else RECIPES
    device = "cpu" if args.smoke else torch.cuda.get_device_name()
    peak = None if args.smoke else peak_tflops(torch.device("cuda"))
    print(f"{device}, torch {torch.__version__}, {args.nproc} rank(s)\n")
    print("| model | batch/GPU | AC | compile | float8 | step | images/s/GPU | MFU | peak memory | planner |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    grid = itertools.product(
        recipes.items(), args.ac.split(","), args.compile.split(","), args.float8.split(",")
    )
    for (name, recipe), ac, compiled, float8 in grid:
        overrides = [f"parallel.activation_checkpointing={ac}", f"parallel.compile={compiled == 'on'}",
                     f"parallel.float8={float8 == 'on'}"]  # fmt: skip
        if args.smoke:
            overrides += ["train.device=cpu", "train.batch_size=16", "loss.num_slices=64"]
        cfg = load_config(ROOT / recipe, ["run.dir=x", *SYNTHETIC, *overrides])
        plan = make_plan(
            model_shape(cfg), cfg, shard=args.nproc, batch=cfg.train.batch_size, ac=ac, reserve_gib=0
        )
        result = run(recipe, overrides, args.nproc, args.steps)
        cells = [name, cfg.train.batch_size, ac, compiled, float8]
        if "error" in result:
            cells += [f"failed: {result['error']}", "", "", "", f"{plan.total / GiB:.1f} GiB"]
        else:
            step = result["step_s"]
            mfu = f"{100 * plan.flops_per_step / step / 1e12 / peak:.1f}%" if peak else "–"
            cells += [f"{step * 1e3:.0f} ms", f"{cfg.train.batch_size / step:.1f}", mfu,
                      f"{result['peak_gib']:.1f} GiB", f"{plan.total / GiB:.1f} GiB"]  # fmt: skip
        print("| " + " | ".join(map(str, cells)) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
