"""Chrome traces of real training steps: with `profile.enabled=true`, every `profile.every` steps the
trainer records `profile.warmup` + `profile.active` steps and writes the active ones to
`<run.dir>/profile/step-<N>/rank-<R>.json` (open in chrome://tracing or Perfetto)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from lejepa_scale.config import ProfileConfig

log = logging.getLogger(__name__)


class _NoProfiler:
    def step(self) -> None:
        pass


def step_profiler(cfg: ProfileConfig, run_dir: Path, rank: int, start_step: int):
    """A context manager yielding an object whose `step()` the loop calls once per step."""
    if not cfg.enabled:
        return contextlib.nullcontext(_NoProfiler())
    folder = Path(run_dir) / "profile"

    def write(prof: torch.profiler.profile) -> None:
        path = folder / f"step-{prof.step_num:08d}" / f"rank-{rank:05d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(path))
        log.info("profiler trace written to %s", path)

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(
            wait=cfg.every - cfg.warmup - cfg.active, warmup=cfg.warmup, active=cfg.active
        ),
        on_trace_ready=write,
        record_shapes=True,
    )
    profiler.step_num = start_step  # trace folders carry training steps, also after a resume
    return profiler
