"""One command that checks a GPU node before a long run: `python benchmarks/gpu_check.py`.

Each check runs the real trainer (`python -m lejepa_scale.train`, torchrun where FSDP is needed) on
synthetic or generated data and prints one row of a pass/fail table; on a GPU the table is appended,
with the device name, to docs/benchmarks.md. Budget 20 minutes on one H100/H200 with 16 CPU cores,
mostly compiling (the float8 check alone took 3.5 minutes on an H200, 187 s of it the first step).

1. float8 checkpoint: ViT-S/16 with float8 tensorwise and FSDP float8 all-gathers (every block
   weight a torchao subclass): a background (async) checkpoint equals a blocking one of the same
   step, and the final weights load with `torch.load(weights_only=True)` (no torchao classes).
2. host syncs: ViT-L/14, 30 steps, `train.sync_debug=true` (any host sync inside a step that does
   not log is an error, saves and control steps included in the run), compiled blocks; recompiles
   and graph breaks counted from TORCH_LOGS.
3. profiler: a chrome trace of step 25 of that run (it neither logs, saves nor agrees), scanned
   for pageable host-to-device copies and stream/device synchronisations.
4. step and memory: ViT-H/14 and ViT-g/14 per activation-checkpointing mode at world 1: step time,
   MFU, `max_memory_allocated` against the planner (passes when measured <= predicted + 10 %, or
   when the planner said it does not fit and it ran out of memory).
5. data wait: generated JPEG shards read by `ShardViews` with 8 workers under a ViT-L/14 step:
   the fraction of the step spent waiting for data (passes under 10 %).

`--smoke` runs the same checks with tiny shapes on CPU (what CI runs): float8 emulated on 2 gloo
ranks, no compile, and nothing is appended.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lejepa_scale.config import load_config  # noqa: E402
from lejepa_scale.plan import GiB, make_plan, model_shape  # noqa: E402
from lejepa_scale.training.metrics import peak_tflops  # noqa: E402

SYNTHETIC = [
    "data.source=digits",
    "data.train=null",
    "data.val=null",
    "log.wandb=disabled",
    "log.health_every=100000",
    "parallel.dp_replicate=1",
]
TINY = [
    "model.backbone_kwargs={patch_size: 4, embed_dim: 64, depth: 2, num_heads: 2}",
    "train.batch_size=16",
    "loss.num_slices=64",
    "train.device=cpu",
]


class Check:
    """The shapes of one mode: real recipes on a GPU, the tiny ViT demo on CPU."""

    def __init__(self, smoke: bool, out: Path, logs: Path | None = None):
        self.smoke, self.out, self.logs = smoke, out, logs
        self.small = "configs/demo_cpu_vit.yaml" if smoke else "configs/vit_s16_imagenette.yaml"
        self.large = "configs/demo_cpu_vit.yaml" if smoke else "configs/vit_l14_in1k.yaml"
        self.sizes = TINY if smoke else []

    def train(self, recipe: str, run_dir: Path, *overrides: str, nproc: int = 1, env: dict | None = None):
        """The trainer, to its end; (exit code, stderr, metrics records)."""
        args = ["--config", str(ROOT / recipe), f"run.dir={run_dir}", *self.sizes, *overrides]
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        command = [
            sys.executable,
            *(launcher if nproc > 1 or "parallel.float8=true" in overrides else []),
            "-m",
            "lejepa_scale.train",
            *args,
        ]
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": python_path(), **(env or {})},
        )
        if self.logs:
            self.logs.mkdir(parents=True, exist_ok=True)
            (self.logs / f"{run_dir.name}.log").write_text(result.stderr)
        path = run_dir / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return result.returncode, result.stderr, records


def python_path() -> str:
    """The checkout first, then whatever the caller's PYTHONPATH held (packages installed beside)."""
    return os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


def failure(stderr: str) -> str:
    """What a trainer died of: the last exception line of its ranks' tracebacks (not torchrun's
    ChildFailedError that only says a rank failed), else the end of stderr."""
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", line) for line in stderr.splitlines()]
    exception = re.compile(r"[\w.]*(Error|Exception)(:|$)")
    raised = [line for line in lines if exception.match(line) and "ChildFailed" not in line]
    return (raised[-1] if raised else stderr[-200:]).strip()[:160]


def float8_checkpoint(check: Check) -> list[tuple[str, bool, str]]:
    from lejepa_scale.pretrained import load_run

    nproc = 2 if check.smoke else 1
    common = [
        *SYNTHETIC,
        "parallel.float8=true",
        "parallel.float8_all_gather=true",
        "train.steps=5",
        "checkpoint.every_steps=2",
        "train.log_every=1",
    ]
    runs = {}
    for kind, extra in (("async", []), ("blocking", ["checkpoint.async_save=false"])):
        code, stderr, _ = check.train(check.small, check.out / f"f8-{kind}", *common, *extra, nproc=nproc)
        if code:
            return [("float8 async checkpoint = live weights", False, failure(stderr))]
        runs[kind] = load_run(check.out / f"f8-{kind}/checkpoints/step-00000004")[0].state_dict()
    differ = [k for k, v in runs["blocking"].items() if not torch.equal(v, runs["async"][k])]
    final = torch.load(check.out / "f8-async/model.pt", weights_only=True)
    plain = all(type(v) is torch.Tensor for v in final.values())
    return [
        ("float8 async checkpoint = live weights", not differ, f"{len(differ)} tensors differ"),
        ("float8 weights saved as plain tensors", plain, "model.pt loads with weights_only=True"),
    ]


def syncs_and_trace(check: Check) -> list[tuple[str, bool, str]]:
    """30 steps with sync_debug (saves after steps 6, 13, 20, 27; control steps 9, 19, 29; logging
    0, 10, 20, 29), compiled on a GPU, and a profiler trace of step 25, which does none of these."""
    run_dir = check.out / "syncs"
    overrides = [
        *SYNTHETIC,
        "train.steps=30",
        "train.log_every=10",
        "checkpoint.every_steps=7",
        "train.sync_debug=true",
        f"parallel.compile={not check.smoke}",
        "profile.enabled=true",
        "profile.every=25",
        "profile.warmup=2",
        "profile.active=1",
    ]
    env = {"TORCH_LOGS": "recompiles,graph_breaks"}
    start = time.perf_counter()
    code, stderr, records = check.train(check.large, run_dir, *overrides, env=env)
    seconds = time.perf_counter() - start
    recompiles = len(re.findall(r"Recompiling function", stderr))
    breaks = len(re.findall(r"Graph break", stderr))
    rows = [
        (
            "30 steps with sync_debug" + ("" if check.smoke else " + compile"),
            code == 0,
            f"{seconds:.0f} s; {recompiles} recompiles, {breaks} graph breaks"
            if code == 0
            else failure(stderr),
        )
    ]
    traces = sorted(run_dir.glob("profile/step-*/rank-*.json"))
    if not traces:
        return [*rows, ("profiler trace: no pageable copies or syncs", False, "no trace written")]
    events = json.loads(traces[0].read_text()).get("traceEvents", [])
    names = [e.get("name", "") for e in events]
    pageable = sum("Pageable" in n and "HtoD" in n for n in names)
    syncs = sum(
        n in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize") for n in names
    )
    detail = f"step 25: {pageable} pageable HtoD copies, {syncs} syncs in {len(names)} trace events"
    return [*rows, ("profiler trace: no pageable copies or syncs", pageable == 0 and syncs == 0, detail)]


def step_and_memory(check: Check) -> list[tuple[str, bool, str]]:
    recipes = (
        {"tiny ViT": "configs/demo_cpu_vit.yaml"}
        if check.smoke
        else {"ViT-H/14": "configs/vit_h14_in1k.yaml", "ViT-g/14": "configs/vit_g14_in1k_16nodes.yaml"}
    )
    peak = None if check.smoke else peak_tflops(torch.device("cuda"))
    budget = None if check.smoke else torch.cuda.get_device_properties(0).total_memory
    n, rows = 3, []
    for name, recipe in recipes.items():
        for ac in ("none", "op", "selective", "full"):
            overrides = [
                *SYNTHETIC,
                f"parallel.activation_checkpointing={ac}",
                f"train.steps={2 * n + 1}",
                f"train.log_every={n}",
                "checkpoint.enabled=false",
            ]
            cfg = load_config(ROOT / recipe, ["run.dir=x", *check.sizes, *overrides])
            plan = make_plan(model_shape(cfg), cfg, shard=1, batch=cfg.train.batch_size, ac=ac, reserve_gib=0)
            code, stderr, records = check.train(recipe, check.out / f"mem-{name[:5]}-{ac}", *overrides)
            label = f"{name} AC {ac}, batch {cfg.train.batch_size}"
            if code or len(records) < 3:
                oom = "out of memory" in stderr.lower()
                fits = budget is None or plan.total <= budget
                rows.append(
                    (label, oom and not fits, f"planner {plan.total / GiB:.1f} GiB; {failure(stderr)}")
                )
                continue
            step = (records[2]["time"] - records[1]["time"]) / n
            measured = records[2]["peak_mem_gib"]
            mfu = f", MFU {100 * plan.flops_per_step / step / 1e12 / peak:.1f}%" if peak else ""
            ok = check.smoke or measured * GiB <= 1.1 * plan.total  # CPU peak is the process RSS
            rows.append(
                (
                    label,
                    ok,
                    f"{step * 1e3:.0f} ms/step{mfu}, peak {measured:.1f} GiB, planner "
                    f"{plan.total / GiB:.1f} GiB",
                )
            )
    return rows


def data_wait(check: Check) -> list[tuple[str, bool, str]]:
    """Generated JPEG shards (the converter on real-photo crops) read by ShardViews under a step."""
    from tests.image_tree import make_class_tree

    images, shards = check.out / "jpegs", check.out / "shards"
    per_class = 16 if check.smoke else 256
    make_class_tree(images, classes=8, per_class=per_class, seed=0)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "data_pipeline.convert",
            "folder",
            "--src",
            str(images),
            "--out",
            str(shards),
            "--shard-size",
            "64",
        ],
        check=True,
        capture_output=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": python_path()},
    )
    workers = 2 if check.smoke else 8
    overrides = [
        "data.source=shards",
        f"data.train={shards}",
        f"data.num_workers={workers}",
        "log.wandb=disabled",
        "train.steps=21",
        "train.log_every=10",
        "checkpoint.enabled=false",
        "train.online_probe=false",
    ]
    code, stderr, records = check.train(check.large, check.out / "data", *overrides)
    if code or len(records) < 3:
        return [(f"data wait, {workers} workers", False, failure(stderr))]
    wait = records[-1]["data_wait"]
    return [(f"data wait, {workers} workers", check.smoke or wait < 0.1, f"{100 * wait:.1f}% of the step")]


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/gpu_check.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the checks (CI)")
    parser.add_argument("--only", help="comma-separated: float8,syncs,memory,data")
    parser.add_argument("--logs", type=Path, help="folder for each trainer run's stderr (<run>.log)")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print("no GPU visible: nothing checked (use --smoke to run the checks on CPU)")
        return 1
    device = "CPU (smoke)" if args.smoke else torch.cuda.get_device_name()
    checks = {
        "float8": float8_checkpoint,
        "syncs": syncs_and_trace,
        "memory": step_and_memory,
        "data": data_wait,
    }
    chosen = args.only.split(",") if args.only else list(checks)
    rows, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        check = Check(args.smoke, Path(scratch), args.logs)
        for name in chosen:
            for row in checks[name](check):
                rows.append(row)
                print(f"{'PASS' if row[1] else 'FAIL'}  {row[0]}: {row[2]}", flush=True)
    minutes = (time.perf_counter() - start) / 60
    table = [
        f"\n### {device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')} ({minutes:.1f} min)\n",
        "| check | result | measured |",
        "|---|---|---|",
        *(f"| {name} | {'pass' if ok else 'FAIL'} | {detail} |" for name, ok, detail in rows),
    ]
    print("\n".join(table))
    if not args.smoke:
        with open(ROOT / "docs/benchmarks.md", "a") as f:
            f.write("\n".join(["", "Command: `python benchmarks/gpu_check.py`", *table, ""]))
    return 0 if all(ok for _, ok, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
