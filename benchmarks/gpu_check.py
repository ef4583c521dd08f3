"""The GPU acceptance command, one call inside one GPU lease:

    python benchmarks/gpu_check.py --budget-s 480 --out DIR

Checks run in a fixed order, cheapest proof first and compile last. Before each starts, its time is
estimated (planner FLOPs at a conservative MFU, process starts, known compile costs) and it is
skipped, with the estimate as the reason, when it would not fit what is left of `--budget-s`; a
trainer still running at the budget's end is stopped. Each check appends one JSON line to
`DIR/gpu_check.jsonl` the moment it ends (flushed and fsynced: pass / fail / skipped, its numbers,
the reason, seconds taken), after a first line that describes the machine, so a run killed at any
point keeps every finished row. `--render FILE` prints a jsonl as the markdown table that goes into
docs/benchmarks.md.

1. step: eager bf16 ViT-H/14 in the real trainer at world 1, AC none and op-level SAC, at the
   largest batch the planner fits: step time, images/s, MFU, `max_memory_allocated` vs the planner.
2. checkpoint: a background (async) save of a small ViT, plain bf16 and float8 (tensorwise, float8
   all-gathers), reloaded: equal to the live weights of the same run at that step, plain tensors.
3. syncs: 30 steps of the small ViT with `train.sync_debug=true` (saves and control steps inside),
   eager; and a profiler trace of a step that neither logs, saves nor agrees, scanned for
   pageable host-to-device copies and stream synchronisations.
4. data: `ShardViews` over generated ImageNet-sized JPEG shards at 8 and 14 workers: images/s
   against what step 1 consumes, and the data wait of a real ViT-H/14 run on those shards.
5. memory: ViT-g/14 at the 16-node recipe's per-GPU batch and checkpointing: one step fits, memory
   against the planner.
6. compile: ViT-S/16, eager then compiled: first-step time, recompiles and graph breaks across the
   two crop sizes, steady step time against eager (TORCHINDUCTOR_CACHE_DIR under DIR).

`--smoke` runs the same checks with tiny shapes on CPU (what CI runs; compile is skipped there).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lejepa_scale.config import Config, load_config  # noqa: E402
from lejepa_scale.plan import GiB, largest_batch, make_plan, model_shape  # noqa: E402
from lejepa_scale.training.flops import flops_per_sample  # noqa: E402
from lejepa_scale.training.metrics import peak_tflops  # noqa: E402

RESULTS = "gpu_check.jsonl"
STOPPED = "StoppedAtBudget"  # what a process stopped at the budget's end reports
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
CONSERVATIVE_MFU = 0.2  # what estimates assume a step reaches (eager, before any tuning)
COMPILE_S = 240.0  # a cold inductor compile of the blocks before the first step (187 s seen on an H200)


@dataclass
class Row:
    """One check's outcome, as one line of gpu_check.jsonl."""

    check: str
    status: str  # pass | fail | skipped | stopped (the budget ran out first: not known, not failed)
    detail: str = ""  # the numbers in words, or why it failed or was skipped
    numbers: dict = field(default_factory=dict)
    seconds: float = 0.0
    estimate_s: float | None = None


class Results:
    """gpu_check.jsonl, appended one line at a time and flushed to disk at once."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / RESULTS
        self.rows: list[dict] = []

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows.append(row)


class Budget:
    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.monotonic()

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)


class Machine:
    """What the checks run on and with: the real recipes on a GPU, the tiny ViT demo on CPU."""

    def __init__(self, smoke: bool, out: Path, budget: Budget, logs: Path | None):
        self.smoke, self.out, self.budget, self.logs = smoke, out, budget, logs
        self.names = (
            {"large": "tiny ViT", "small": "tiny ViT", "giant": "tiny ViT"}
            if smoke
            else {"large": "ViT-H/14", "small": "ViT-S/16", "giant": "ViT-g/14"}
        )
        self.large = "configs/demo_cpu_vit.yaml" if smoke else "configs/vit_h14_in1k.yaml"
        self.small = "configs/demo_cpu_vit.yaml" if smoke else "configs/vit_s16_imagenette.yaml"
        self.giant = "configs/demo_cpu_vit.yaml" if smoke else "configs/vit_g14_in1k_16nodes.yaml"
        self.sizes = TINY if smoke else []
        self.peak = None if smoke else peak_tflops(torch.device("cuda"))
        self.memory = None if smoke else torch.cuda.get_device_properties(0).total_memory
        self.start_s = 6.0 if smoke else 45.0  # one trainer process: imports, CUDA, model, first step
        self.consumed: float | None = None  # images/s of step 1, what the data path must keep up with

    def config(self, recipe: str, *overrides: str) -> Config:
        return load_config(ROOT / recipe, ["run.dir=x", *self.sizes, *overrides])

    def step_seconds(self, cfg: Config) -> float:
        """A step at the conservative MFU (the smoke's tiny ViT: a fixed CPU step)."""
        if self.smoke:
            return 0.05
        flops = flops_per_sample(model_shape(cfg), cfg) * cfg.train.batch_size
        return flops / (CONSERVATIVE_MFU * self.peak * 1e12)

    def run_estimate(self, cfg: Config, steps: int, processes: int = 1) -> float:
        return processes * self.start_s + steps * self.step_seconds(cfg)

    def train(self, recipe: str, run_dir: Path, *overrides: str, nproc: int = 1, env: dict | None = None):
        """The trainer to its end, or until the budget runs out; (exit code, stderr, metrics records).
        torchrun whenever FSDP is wanted (float8 all-gathers need it, also at world 1)."""
        args = ["--config", str(ROOT / recipe), f"run.dir={run_dir}", *self.sizes, *overrides]
        torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        fsdp = nproc > 1 or "parallel.float8=true" in overrides
        command = [sys.executable, *(torchrun if fsdp else []), "-m", "lejepa_scale.train", *args]
        code, stderr = self.call(command, run_dir.name, env)
        path = run_dir / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return code, stderr, records

    def call(self, command: list[str], name: str, env: dict | None = None) -> tuple[int, str]:
        """A subprocess in its own process group, stopped (with its children) at the budget's end."""
        env = {**os.environ, "PYTHONPATH": python_path(), **(env or {})}
        proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
            start_new_session=True,
        )
        try:
            stdout, stderr = proc.communicate(timeout=max(1.0, self.budget.left()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            stderr += f"\n{STOPPED}: {name} still ran when --budget-s ran out"
        if self.logs:
            self.logs.mkdir(parents=True, exist_ok=True)
            (self.logs / f"{name}.log").write_text(stdout + stderr)
        return proc.returncode, stdout + stderr


def python_path() -> str:
    """The checkout first, then whatever the caller's PYTHONPATH held (packages installed beside)."""
    return os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


def failure(stderr: str) -> str:
    """What a process died of: the last exception line of its ranks' tracebacks (not torchrun's
    ChildFailedError that only says a rank failed), else the end of its output."""
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", line) for line in stderr.splitlines()]
    exception = re.compile(rf"[\w.]*(Error|Exception|{STOPPED})(:|$)")
    raised = [line for line in lines if exception.match(line) and "ChildFailed" not in line]
    return (raised[-1] if raised else stderr[-200:]).strip()[:200]


def timing(records: list[dict], n: int) -> float | None:
    """Seconds per step between the logged steps n and 2n (the loop runs ahead between them)."""
    by_step = {r["step"]: r for r in records}
    if n not in by_step or 2 * n not in by_step:
        return None
    return (by_step[2 * n]["time"] - by_step[n]["time"]) / n


# -- the checks, in the order they run -------------------------------------------------------------


def check_step(m: Machine) -> list[Row]:
    """Eager bf16 large ViT at world 1, AC none and op, at the planner's largest batch; the targets
    (eager MFU >= 40 %, memory within 15 % of the planner) are recorded, not required."""
    rows, n = [], 3
    for ac in ("none", "op"):
        overrides = [
            *SYNTHETIC,
            f"parallel.activation_checkpointing={ac}",
            f"train.steps={2 * n + 1}",
            f"train.log_every={n}",
            "checkpoint.enabled=false",
            "train.online_probe=false",
        ]
        if not m.smoke:  # the largest batch that fits this GPU, a multiple of 8
            cfg = m.config(m.large, *overrides)
            fit = largest_batch(model_shape(cfg), cfg, shard=1, ac=ac, budget=m.memory, reserve_gib=2.0)
            overrides.append(f"train.batch_size={max(8, fit // 8 * 8)}")
        cfg = m.config(m.large, *overrides)
        plan = make_plan(model_shape(cfg), cfg, shard=1, batch=cfg.train.batch_size, ac=ac, reserve_gib=0)
        start = time.monotonic()
        code, stderr, records = m.train(m.large, m.out / f"step-{ac}", *overrides)
        label = f"step: {m.names['large']} eager, AC {ac}, batch {cfg.train.batch_size}"
        seconds, step = time.monotonic() - start, timing(records, n)
        if code or step is None:
            rows.append(Row(label, "fail", failure(stderr), seconds=seconds))
            continue
        numbers = {
            "batch": cfg.train.batch_size,
            "step_s": round(step, 4),
            "img_per_s": round(cfg.train.batch_size / step, 1),
        }
        detail = f"{1e3 * step:.0f} ms/step, {numbers['img_per_s']} img/s"
        if not m.smoke:  # on CPU the peak memory is the process's RSS, not the planner's quantity
            measured, planned = records[-1]["peak_mem_gib"], plan.total / GiB
            mfu = plan.flops_per_step / step / 1e12 / m.peak
            numbers.update(
                mfu=round(mfu, 4),
                peak_mem_gib=round(measured, 2),
                planner_gib=round(planned, 2),
                targets={
                    "mfu >= 40 %": mfu >= 0.4,
                    "memory within 15 % of the planner": abs(measured - planned) <= 0.15 * planned,
                },
            )
            detail += f", MFU {100 * mfu:.1f} %; memory {measured:.1f} GiB, planner {planned:.1f} GiB"
        m.consumed = m.consumed or numbers["img_per_s"]
        rows.append(Row(label, "pass", detail, numbers, seconds))
    return rows


def estimate_step(m: Machine) -> float:
    return 2 * m.run_estimate(m.config(m.large, *SYNTHETIC), 7)


def check_checkpoint(m: Machine) -> list[Row]:
    """A background save reloaded equals the live weights of the same run (bf16, then float8)."""
    rows = []
    for kind, extra in (
        ("bf16", []),
        ("float8", ["parallel.float8=true", "parallel.float8_all_gather=true"]),
    ):
        nproc = 2 if m.smoke else 1
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            str(ROOT / "benchmarks" / "checkpoint_roundtrip.py"),
            "--config",
            str(ROOT / m.small),
            f"run.dir={m.out / f'roundtrip-{kind}'}",
            *m.sizes,
            *SYNTHETIC,
            *extra,
        ]
        start = time.monotonic()
        code, output = m.call(command, f"roundtrip-{kind}")
        seconds = time.monotonic() - start
        found = re.search(r"^ROUNDTRIP (\{.*\})$", output, re.M)
        label = f"checkpoint: async save of {kind} = live weights"
        if code or not found:
            rows.append(Row(label, "fail", failure(output), seconds=seconds))
            continue
        result = json.loads(found.group(1))
        ok = result["differ"] == 0 and result["plain"]
        detail = f"{result['tensors']} tensors, {result['differ']} differ; plain tensors: {result['plain']}"
        rows.append(Row(label, "pass" if ok else "fail", detail, result, seconds))
    return rows


def estimate_checkpoint(m: Machine) -> float:
    return 2 * m.run_estimate(m.config(m.small, *SYNTHETIC), 4, processes=2 if m.smoke else 1)


def check_syncs(m: Machine) -> list[Row]:
    """30 eager steps with sync_debug (saves after steps 6, 13, 20, 27; control steps 9, 19, 29;
    logging 0, 10, 20, 29) and a profiler trace of step 25, which does none of these."""
    run_dir = m.out / "syncs"
    overrides = [
        *SYNTHETIC,
        "train.steps=30",
        "train.log_every=10",
        "checkpoint.every_steps=7",
        "train.sync_debug=true",
        "profile.enabled=true",
        "profile.every=25",
        "profile.warmup=2",
        "profile.active=1",
    ]
    start = time.monotonic()
    code, stderr, _ = m.train(m.small, run_dir, *overrides)
    seconds = time.monotonic() - start
    rows = [
        Row(
            "syncs: 30 eager steps with sync_debug, saves and control steps inside",
            "pass" if code == 0 else "fail",
            "no host sync raised" if code == 0 else failure(stderr),
            seconds=seconds,
        )
    ]
    traces = sorted(run_dir.glob("profile/step-*/rank-*.json"))
    if not traces:
        return [*rows, Row("syncs: profiler trace of a quiet step", "fail", "no trace written")]
    names = [e.get("name", "") for e in json.loads(traces[0].read_text()).get("traceEvents", [])]
    pageable = sum("Pageable" in n and "HtoD" in n for n in names)
    syncs = sum(
        n in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize") for n in names
    )
    numbers = {"pageable_htod": pageable, "syncs": syncs, "events": len(names)}
    detail = f"step 25: {pageable} pageable HtoD copies, {syncs} syncs in {len(names)} trace events"
    return [
        *rows,
        Row(
            "syncs: profiler trace of a quiet step",
            "pass" if pageable == syncs == 0 else "fail",
            detail,
            numbers,
        ),
    ]


def estimate_syncs(m: Machine) -> float:
    return m.run_estimate(m.config(m.small, *SYNTHETIC), 30) + (0 if m.smoke else 20)  # + 5 saves


def check_data(m: Machine) -> list[Row]:
    """Generated JPEG shards (500x375 crops of real photos, like ImageNet's) through ShardViews alone
    at 8 and 14 workers, then under a real run of the large model on them."""
    spec = importlib.util.spec_from_file_location(
        "data_throughput", ROOT / "benchmarks" / "data_throughput.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    start = time.monotonic()
    shards = bench.make_shards(m.out / "data", 96 if m.smoke else 2048, shard_size=32 if m.smoke else 256)
    rows, workers, batch = [], (1, 2) if m.smoke else (8, 14), 8 if m.smoke else 32
    for count in workers:
        command = [
            sys.executable,
            str(ROOT / "benchmarks" / "data_throughput.py"),
            "--loader",
            str(shards),
            "--workers",
            str(count),
            "--batch",
            str(batch),
            "--batches",
            "4" if m.smoke else "40",
        ]
        code, output = m.call(command, f"data-{count}")
        found = re.search(r"^THROUGHPUT (\{.*\})$", output, re.M)
        label = f"data: ShardViews alone, {count} workers"
        if code or not found:
            rows.append(Row(label, "fail", failure(output), seconds=time.monotonic() - start))
            continue
        rate = json.loads(found.group(1))["img_per_s"]
        keeps_up = m.smoke or m.consumed is None or rate >= m.consumed
        against = f" vs {m.consumed} img/s that the step check consumes" if m.consumed else ""
        rows.append(
            Row(
                label,
                "pass" if keeps_up else "fail",
                f"{rate:.0f} img/s{against}",
                {"img_per_s": rate, "consumed": m.consumed},
                time.monotonic() - start,
            )
        )
        start = time.monotonic()
    overrides = [
        "data.source=shards",
        f"data.train={shards}",
        f"data.num_workers={workers[-1]}",
        "log.wandb=disabled",
        "train.steps=21",
        "train.log_every=10",
        "checkpoint.enabled=false",
        "train.online_probe=false",
    ]
    code, stderr, records = m.train(m.large, m.out / "data-run", *overrides)
    label = f"data: wait in a real run, {workers[-1]} workers"
    if code or len(records) < 3:
        return [*rows, Row(label, "fail", failure(stderr), seconds=time.monotonic() - start)]
    wait = sum(r["data_wait"] for r in records[1:]) / len(records[1:])
    return [
        *rows,
        Row(
            label,
            "pass" if m.smoke or wait < 0.1 else "fail",
            f"{100 * wait:.1f} % of the step",
            {"data_wait": round(wait, 4)},
            time.monotonic() - start,
        ),
    ]


def estimate_data(m: Machine) -> float:
    generate, alone = (3.0, 6.0) if m.smoke else (40.0, 40.0)  # the shards; one loader measured alone
    return generate + 2 * alone + m.run_estimate(m.config(m.large, *SYNTHETIC), 21)


def check_memory(m: Machine) -> list[Row]:
    """ViT-g/14 at the 16-node recipe's per-GPU batch and activation checkpointing, world 1: one
    step fits (the planner's prediction beside it is a recorded target)."""
    overrides = [
        *SYNTHETIC,
        "train.steps=2",
        "train.log_every=1",
        "checkpoint.enabled=false",
        "train.online_probe=false",
    ]
    cfg = m.config(m.giant, *overrides)
    ac = cfg.parallel.activation_checkpointing
    plan = make_plan(model_shape(cfg), cfg, shard=1, batch=cfg.train.batch_size, ac=ac, reserve_gib=0)
    start = time.monotonic()
    code, stderr, records = m.train(m.giant, m.out / "memory", *overrides)
    label = f"memory: {m.names['giant']}, batch {cfg.train.batch_size}, AC {ac}"
    if code or not records:
        return [
            Row(
                label,
                "fail",
                f"planner {plan.total / GiB:.1f} GiB; {failure(stderr)}",
                seconds=time.monotonic() - start,
            )
        ]
    measured, planned = records[-1]["peak_mem_gib"], plan.total / GiB
    if m.smoke:  # on CPU the peak is the process's RSS, not what the planner models
        return [Row(label, "pass", "one step ran", seconds=time.monotonic() - start)]
    within = abs(measured - planned) <= 0.15 * planned
    numbers = {"peak_mem_gib": round(measured, 2), "planner_gib": round(planned, 2),
               "targets": {"memory within 15 % of the planner": within}}  # fmt: skip
    detail = f"one step fits: peak {measured:.1f} GiB, planner {planned:.1f} GiB"
    return [Row(label, "pass", detail, numbers, time.monotonic() - start)]


def estimate_memory(m: Machine) -> float:
    return m.run_estimate(m.config(m.giant, *SYNTHETIC), 2) + (0 if m.smoke else 30)  # + a 1.8 B init


def check_compile(m: Machine) -> list[Row]:
    """ViT-S/16 eager, then with compiled blocks: first step, recompiles, graph breaks, steady step."""
    if m.smoke:
        return [Row("compile: ViT-S/16", "skipped", "compile is checked on GPUs only")]
    n, steps = 5, {}
    overrides = [
        *SYNTHETIC,
        f"train.steps={2 * n + 1}",
        f"train.log_every={n}",
        "checkpoint.enabled=false",
        "train.online_probe=false",
    ]
    env = {"TORCH_LOGS": "recompiles,graph_breaks", "TORCHINDUCTOR_CACHE_DIR": str(m.out / "inductor")}
    rows = []
    for compiled in (False, True):
        start = time.monotonic()
        code, stderr, records = m.train(
            m.small, m.out / f"compile-{compiled}", *overrides, f"parallel.compile={compiled}", env=env
        )
        seconds, step = time.monotonic() - start, timing(records, n)
        if code or step is None:
            rows.append(
                Row(
                    f"compile: ViT-S/16 {'compiled' if compiled else 'eager'}",
                    "fail",
                    failure(stderr),
                    seconds=seconds,
                )
            )
            return rows
        steps[compiled] = step
    first = records[0]["time"]
    recompiles, breaks = (
        len(re.findall(r"Recompiling function", stderr)),
        len(re.findall(r"Graph break", stderr)),
    )
    numbers = {
        "first_step_s": first,
        "recompiles": recompiles,
        "graph_breaks": breaks,
        "step_s": round(steps[True], 4),
        "eager_step_s": round(steps[False], 4),
    }
    detail = (
        f"first step {first:.0f} s, {recompiles} recompiles, {breaks} graph breaks; "
        f"{1e3 * steps[True]:.0f} ms/step vs {1e3 * steps[False]:.0f} eager"
    )
    return [Row("compile: ViT-S/16 compiled blocks", "pass", detail, numbers, seconds)]


def estimate_compile(m: Machine) -> float:
    if m.smoke:
        return 0.0
    return COMPILE_S + m.run_estimate(m.config(m.small, *SYNTHETIC), 11, processes=2)


CHECKS: dict[str, tuple[Callable[[Machine], list[Row]], Callable[[Machine], float]]] = {
    "step": (check_step, estimate_step),
    "checkpoint": (check_checkpoint, estimate_checkpoint),
    "syncs": (check_syncs, estimate_syncs),
    "data": (check_data, estimate_data),
    "memory": (check_memory, estimate_memory),
    "compile": (check_compile, estimate_compile),
}


# -- the machine, the table ------------------------------------------------------------------------


def environment(smoke: bool) -> dict:
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    row = {
        "check": "environment",
        "status": "pass",
        "device": "CPU (smoke)" if smoke else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_cores": len(os.sched_getaffinity(0)),
        "timm": version("timm"),
        "torchao": version("torchao"),
        "torchtitan": version("torchtitan"),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    if not smoke:
        row["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / GiB, 1)
        row["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        row["driver"] = driver.stdout.strip() or "unknown"
    return row


def render(path: Path) -> str:
    """The markdown table of a gpu_check.jsonl, headed by the machine it ran on."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    env = next((r for r in rows if r["check"] == "environment"), {})
    versions = ", ".join(
        f"{k} {env[k]}"
        for k in ("torch", "cuda", "nccl", "driver", "timm", "torchao", "torchtitan")
        if env.get(k)
    )
    total = sum(r.get("seconds", 0) for r in rows if r["check"] != "environment")
    lines = [
        f"### {env.get('device', '?')}, {env.get('date', '?')} ({env.get('cpu_cores', '?')} CPU cores; "
        f"{versions})",
        "",
        f"`python benchmarks/gpu_check.py`: {len(rows) - 1} rows, {total:.0f} s in checks.",
        "",
        "| check | result | s | measured |",
        "|---|---|---|---|",
    ]
    for r in rows:
        if r["check"] != "environment":
            estimate = f" (estimate {r['estimate_s']:.0f} s)" if r.get("estimate_s") else ""
            result = r["status"] if r["status"] != "fail" else "FAIL"
            lines.append(f"| {r['check']} | {result} | {r.get('seconds', 0):.0f} | {r['detail']}{estimate} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/gpu_check.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--budget-s", type=float, default=480, help="stop before this many seconds (default 480)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "runs" / "gpu_check",
        help=f"folder of {RESULTS} and the runs (default runs/gpu_check)",
    )
    parser.add_argument("--only", help=f"comma-separated, in this order: {','.join(CHECKS)}")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the checks (CI)")
    parser.add_argument("--logs", type=Path, help="folder for each process's output (<run>.log)")
    parser.add_argument("--render", type=Path, metavar="FILE", help=f"print a {RESULTS} as a markdown table")
    args = parser.parse_args(argv)
    if args.render:
        print(render(args.render))
        return 0
    if not args.smoke and not torch.cuda.is_available():
        print("no GPU visible: nothing checked (use --smoke to run the checks on CPU)")
        return 1
    chosen = args.only.split(",") if args.only else list(CHECKS)
    unknown = [name for name in chosen if name not in CHECKS]
    if unknown:
        parser.error(f"--only {','.join(unknown)}: the checks are {','.join(CHECKS)}")
    budget, results = Budget(args.budget_s), Results(args.out)
    results.write(environment(args.smoke))
    machine = Machine(args.smoke, args.out, budget, args.logs)
    for name in [n for n in CHECKS if n in chosen]:
        check, estimate = CHECKS[name]
        needed = estimate(machine)
        if needed > budget.left():
            row = Row(
                name,
                "skipped",
                f"needs about {needed:.0f} s, {max(0, budget.left()):.0f} s of the budget left",
                estimate_s=round(needed, 1),
            )
            results.write(row.__dict__)
            print(f"SKIP  {row.check}: {row.detail}", flush=True)
            continue
        for row in check(machine):
            if row.status == "fail" and STOPPED in row.detail:
                row.status = "stopped"
            row.estimate_s = round(needed, 1)
            results.write(row.__dict__)
            print(f"{row.status.upper():<5} {row.check}: {row.detail} ({row.seconds:.0f} s)", flush=True)
    print(f"\n{render(results.path)}\n\nrows: {results.path}")
    return 0 if all(r["status"] != "fail" for r in results.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
