"""Training metrics: a console progress bar (or log lines), `metrics.jsonl` in the run directory, wandb.

wandb runs online when an API key is configured and offline otherwise (clusters without internet);
its run id lives in `<run_dir>/wandb_run_id` and in every checkpoint, so a requeued job keeps
logging to the same run.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import sys
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from lejepa_scale.method.health import collapse_alarm, embedding_health
from lejepa_scale.method.objective import LossParts

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id"
SHOWN = ("loss", "pred", "sigreg", "img_per_s", "probe_acc")


def wandb_mode(setting: str) -> str:
    """`auto`: WANDB_MODE if set, else online when an API key is configured, else offline."""
    if setting != "auto":
        return setting
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    return "offline"


def wandb_run_id(run_dir: Path, known: str | None) -> str:
    """The run's wandb id: from the checkpoint, else from the run dir, else a new one (then saved)."""
    path = run_dir / RUN_ID_FILE
    run_id = known or (path.read_text().strip() if path.exists() else None)
    if run_id is None:
        run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id + "\n")
    return run_id


class MetricsLogger:
    """Turns a logged step's values into metrics (averaged over ranks, throughput, scaled loss,
    embedding health) and writes them: one JSON line per logged step to `<run_dir>/metrics.jsonl`,
    wandb, and the console (a progress bar on a terminal; a log line per logged step in redirected
    output such as SLURM logs). Only the process with `enabled=True` writes; every rank calls
    `log_step` (the average over ranks is a collective). It takes values, not the config."""

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        *,
        start_step: int = 0,
        enabled: bool = True,
        batch_size: int,
        world_size: int,
        device: torch.device,
        flops_per_step: float | None = None,
        lam: float,
        alpha: float = 0.4,
        alarm_after: int = 0,
        wandb_setting: str = "disabled",
        run_id: str | None = None,
        project: str = "lejepa",
        entity: str | None = None,
        name: str | None = None,
        config: dict | None = None,
    ):
        self.enabled, self.total_steps = enabled, total_steps
        self.batch_size, self.world_size, self.device = batch_size, world_size, device
        self.flops_per_step, self.peak = flops_per_step, peak_tflops(device)
        self.lam, self.alpha, self.alarm_after = lam, alpha, alarm_after
        self.run_id = run_id
        self.wandb_run = None
        self.last_logged: tuple[int, float] | None = None  # (step, time) of the last logged step
        path = run_dir / "metrics.jsonl"
        if enabled and path.exists():  # a resumed or restarted run re-logs what followed its checkpoint
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] < start_step]
            path.write_text("".join(f"{line}\n" for line in kept))
        self.file = open(path, "a") if enabled else None  # noqa: SIM115
        self.interactive = sys.stderr.isatty()
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            disable=not (enabled and self.interactive),
            dynamic_ncols=True,
            unit="step",
        )
        self.start = time.perf_counter()
        mode = wandb_mode(wandb_setting)
        if enabled and mode != "disabled":
            import wandb

            self.run_id = wandb_run_id(run_dir, run_id)
            self.wandb_run = wandb.init(
                project=project,
                entity=entity,
                name=name,
                id=self.run_id,
                resume="allow",
                mode=mode,
                dir=run_dir,
                config=config,
                settings=wandb.Settings(console="off", quiet=True),
            )
            if mode == "offline":
                log.info(  # a resumed run adds a folder per start: the pattern names them all
                    "wandb is offline (no API key); upload later with: wandb sync %s",
                    Path(self.wandb_run.dir).parent.parent / f"offline-run-*-{self.run_id}",
                )

    def log_step(
        self,
        step: int,
        *,
        loss: LossParts,
        lr: float,
        grad_norm: torch.Tensor,
        seconds: float,
        data_seconds: float,
        counters: dict[str, float | torch.Tensor],
        embeddings: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    ) -> dict[str, float]:
        """The metrics of one step: loss parts and `counters` (e.g. probe accuracy, corrupt samples)
        averaged over ranks, lr, grad norm, throughput; with `embeddings` (global, local), their
        health. Returns them on every rank. Throughput (images/s, MFU) is measured from one logged
        step to the next, once their values are read (GPUs run ahead of the host); the first logged
        step uses its own host time, `seconds`."""
        values = {"loss": loss.total, "pred": loss.prediction, "sigreg": loss.sigreg, "grad_norm": grad_norm}
        metrics = mean_over_ranks({**values, "data_wait": data_seconds / seconds, **counters}, self.device)
        metrics.update(scaled_loss=scaled_loss(metrics["loss"], self.lam, self.alpha), lr=lr)
        now = time.perf_counter()  # the values were just read: the device has finished this step
        if self.last_logged is not None:  # throughput over the steps since the last logged one
            seconds = (now - self.last_logged[1]) / (step - self.last_logged[0])
        self.last_logged = (step, now)
        metrics.update(throughput(seconds, self.batch_size, self.world_size, self.device, self.flops_per_step,
                                  self.peak))  # fmt: skip
        if embeddings is not None:
            global_batch = self.batch_size * self.world_size
            metrics.update(embedding_health(*embeddings, loss.sigreg_per_view, global_batch))
            alarm = collapse_alarm(metrics)
            if alarm and step >= self.alarm_after and self.enabled:
                log.warning("step %d: %s", step, alarm)
        self.log(step, metrics, read_at=now)
        return metrics

    def log(self, step: int, metrics: dict[str, float], read_at: float) -> None:
        """One record; its time is when the values were read (what throughput is measured between),
        not when the health metrics after it were done."""
        if not self.enabled:
            return
        record = {"step": step, "time": round(read_at - self.start, 3), **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        shown = {k: f"{metrics[k]:.4g}" for k in SHOWN if k in metrics}
        if self.interactive:
            self.bar.set_postfix(shown, refresh=False)
        else:
            log.info(
                "step %d/%d %s", step + 1, self.total_steps, " ".join(f"{k}={v}" for k, v in shown.items())
            )

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def close(self) -> None:
        self.bar.close()
        if self.file:
            self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def mean_over_ranks(values: dict[str, float | torch.Tensor], device: torch.device) -> dict[str, float]:
    """Average scalars over ranks (each rank's prediction loss is its local batch's; values equal on
    every rank, like the grad norm, stay what they are) in one collective and one host read."""
    packed = torch.stack(
        [torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values.values()]
    )
    if dist.is_initialized():
        dist.all_reduce(packed)
        packed /= dist.get_world_size()
    return dict(zip(values, packed.tolist(), strict=True))


def peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 peak TFLOP/s of the GPU (torchtitan's table: it tells H100 SXM, PCIe and NVL apart),
    for MFU; None on CPUs."""
    if device.type != "cuda":
        return None
    from torchtitan.tools.utils import get_peak_flops

    return get_peak_flops(torch.cuda.get_device_name(device)) / 1e12


def peak_memory_gib(device) -> float:
    """Peak allocated GPU memory, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def throughput(
    t_step: float, batch_size: int, world_size: int, device, flops: float | None, peak: float | None
) -> dict[str, float]:
    """Images/s (global and per rank), peak memory, and on known GPUs TFLOP/s and MFU per GPU."""
    out = {
        "img_per_s": batch_size * world_size / t_step,
        "img_per_s_per_rank": batch_size / t_step,
        "peak_mem_gib": peak_memory_gib(device),
    }
    if flops and peak:
        out["tflops"] = flops / t_step / 1e12
        out["mfu"] = out["tflops"] / peak
    return out


def scaled_loss(loss: float, lam: float, alpha: float) -> float:
    """loss / lam**alpha: the paper's label-free signal that tracks linear-probe accuracy across runs."""
    return loss / lam**alpha if lam > 0 else float("nan")


class SampleLog:
    """`log.sample_keys=true`: `<run.dir>/samples/rank<R>.jsonl`, one line per step with the keys of
    every sample this rank trained on, `{"step": s, "keys": [...]}`, appended across restarts. A
    resumed run first drops, from every rank's file (also those of ranks a smaller job no longer
    has), the lines of the steps it trains again; rank 0 does it before its first step, which every
    rank waits for, so no rank appends before. Disabled, it writes nothing."""

    def __init__(self, run_dir: Path, rank: int, start_step: int, enabled: bool):
        self.file = None
        if not enabled:
            return
        folder = Path(run_dir) / "samples"
        if rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            for path in folder.glob("rank*.jsonl"):
                kept = [
                    line for line in path.read_text().splitlines() if json.loads(line)["step"] < start_step
                ]
                path.write_text("".join(f"{line}\n" for line in kept))  # in place: other ranks append to it
        folder.mkdir(parents=True, exist_ok=True)
        self.file = open(folder / f"rank{rank}.jsonl", "a")  # noqa: SIM115

    def write(self, step: int, keys: list[str]) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"step": step, "keys": keys}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
