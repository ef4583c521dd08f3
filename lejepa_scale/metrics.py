"""Training metrics: a console progress bar, `metrics.jsonl` in the run directory, and wandb.

wandb runs online when an API key is configured and offline otherwise (clusters without internet);
its run id lives in `<run_dir>/wandb_run_id` and in every checkpoint, so a requeued job keeps
logging to the same run.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import time
import uuid
from pathlib import Path

from tqdm import tqdm

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
    """Writes one JSON line per logged step to `<run_dir>/metrics.jsonl`, mirrors it to wandb, and
    shows a progress bar with ETA, the loss parts and throughput. Only the process with
    `enabled=True` writes."""

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        *,
        start_step: int = 0,
        enabled: bool = True,
        wandb_setting: str = "disabled",
        run_id: str | None = None,
        project: str = "lejepa",
        entity: str | None = None,
        name: str | None = None,
        config: dict | None = None,
    ):
        self.enabled = enabled
        self.run_id = run_id
        self.wandb_run = None
        path = run_dir / "metrics.jsonl"
        if enabled and path.exists():  # a resumed or restarted run re-logs what followed its checkpoint
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] < start_step]
            path.write_text("".join(f"{line}\n" for line in kept))
        self.file = open(path, "a") if enabled else None  # noqa: SIM115
        self.bar = tqdm(
            total=total_steps, initial=start_step, disable=not enabled, dynamic_ncols=True, unit="step"
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
                log.info(
                    "wandb is offline (no API key); upload later with: wandb sync %s",
                    Path(self.wandb_run.dir).parent,
                )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.perf_counter() - self.start, 3), **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        shown = {k: metrics[k] for k in SHOWN if k in metrics}
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def close(self) -> None:
        self.bar.close()
        if self.file:
            self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}


def peak_tflops(device) -> float | None:
    """Dense bf16 peak of a known GPU (for MFU); None on CPUs and unknown GPUs."""
    if device.type != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def step_flops(cfg) -> float | None:
    """Model FLOPs of one training step on one rank (the planner's ViT count); None for non-ViTs."""
    from lejepa_scale.plan import flops_per_sample, model_shape

    try:
        return flops_per_sample(model_shape(cfg), cfg) * cfg.train.batch_size
    except SystemExit:
        return None


def peak_memory_gib(device) -> float:
    """Peak allocated GPU memory, or the process's peak resident memory on CPU."""
    import torch

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


def scaled_loss(loss: float, cfg) -> float:
    """loss / lam**alpha: the paper's label-free signal that tracks linear-probe accuracy across runs."""
    return loss / cfg.loss.lam**cfg.log.alpha if cfg.loss.lam > 0 else float("nan")
