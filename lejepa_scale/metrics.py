"""Training metrics: a console progress bar and a JSONL file in the run directory."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm


class MetricsLogger:
    """Writes one JSON line per logged step to `<run_dir>/metrics.jsonl` and shows a progress bar
    with ETA, the loss parts and throughput. Only the process with `enabled=True` writes."""

    def __init__(self, run_dir: Path, total_steps: int, *, start_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        path = run_dir / "metrics.jsonl"
        if enabled and path.exists():  # a resumed or restarted run re-logs what followed its checkpoint
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] < start_step]
            path.write_text("".join(f"{line}\n" for line in kept))
        self.file = open(run_dir / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115
        self.bar = tqdm(
            total=total_steps, initial=start_step, disable=not enabled, dynamic_ncols=True, unit="step"
        )
        self.start = time.perf_counter()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.perf_counter() - self.start, 3), **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        shown = {k: metrics[k] for k in ("loss", "pred", "sigreg", "img_per_s", "probe_acc") if k in metrics}
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def close(self) -> None:
        self.bar.close()
        if self.file:
            self.file.close()
