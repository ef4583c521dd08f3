"""A background (async) checkpoint, reloaded, equals the live weights of the same run at that step:
the real components (`build_run`), two steps, a background save of step 2, a third step that
changes the weights while the save is written (the loop waits for the copy to host memory only
before the update), then the checkpoint read back with `load_run` (a plain model, no torchao).

    torchrun --standalone --nproc_per_node 1 benchmarks/checkpoint_roundtrip.py --config RECIPE \\
        run.dir=DIR [key=value ...]

Prints `ROUNDTRIP {"tensors": N, "differ": N, "plain": bool}` on rank 0 (benchmarks/gpu_check.py
runs it for bf16 and float8 weights)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lejepa_scale.config import load_config  # noqa: E402
from lejepa_scale.distributed.parallel import full_state_dict  # noqa: E402
from lejepa_scale.distributed.process_groups import init_distributed  # noqa: E402
from lejepa_scale.pretrained import load_run  # noqa: E402
from lejepa_scale.training.build import build_run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(
        args.config, [*args.overrides, "checkpoint.async_save=true", "checkpoint.every_steps=0"]
    )
    env = init_distributed(cfg.train.device, cfg.parallel.timeout)
    run = build_run(cfg, env)
    batches = iter(run.loader)
    run.model.train()
    for step in range(2):
        run.step([next(batches)], step)
    # rank 0: the whole state after step 2's update, copied (on CPU, buffers would alias the model's)
    live = {name: value.clone() for name, value in full_state_dict(run.model).items()}
    run.checkpointer.save(2)  # in the background
    run.step([next(batches)], 2)  # changes every weight once the copy is done
    run.checkpointer.finish()
    if dist.is_initialized():
        dist.destroy_process_group()
    if env.is_main:  # read back in this process alone
        reloaded = load_run(Path(cfg.run.dir) / "checkpoints" / "step-00000002")[0].state_dict()
        differ = [k for k, v in live.items() if k not in reloaded or not torch.equal(v, reloaded[k])]
        plain = all(type(v) is torch.Tensor for v in reloaded.values())
        print(
            "ROUNDTRIP " + json.dumps({"tensors": len(live), "differ": len(differ), "plain": plain}),
            flush=True,
        )
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
