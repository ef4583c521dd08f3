"""GPU throughput of a LeJEPA step: images/s, step time, TFLOP/s, MFU and peak memory.

torchrun --nproc_per_node 1 benchmarks/gpu_step.py [--models vit_large_patch14_224,vit_huge_patch14_224]
    [--batch 64] [--ac none] [--steps 20] [--peak-tflops 989]

Workload: 2 x 224 + 6 x 98 views, bf16 autocast with bf16 FSDP2 parameters and fp32 reduction,
FSDP2 at the world size torchrun gives (1 for the single-GPU numbers), AdamW, the full LeJEPA
loss with 1024 slices. MFU = model FLOPs of forward + backward (recomputation excluded, counted by
lejepa_scale.plan) / step time / the GPU's dense bf16 peak (989 TFLOP/s for an H100 SXM). Prints
one markdown row per model. Exits without measuring when no GPU is visible.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.distributed as dist

from lejepa_scale.build import build_loss, build_optimizer, build_parallel_model, build_scheduler
from lejepa_scale.config import load_config
from lejepa_scale.parallel import init_distributed
from lejepa_scale.plan import flops_per_sample, model_shape
from lejepa_scale.step import train_step


def bench(name: str, args, env) -> str:
    cfg = load_config(
        None,
        [
            "run.dir=unused",
            f"model.name={name}",
            "views.global_size=224",
            "views.local_size=98",
            f"train.batch_size={args.batch}",
            "train.precision=bf16",
            f"parallel.activation_checkpointing={args.ac}",
            f"parallel.compile={args.compile}",
            "model.drop_path=0.0",
        ],
    )
    model = build_parallel_model(cfg, env)
    loss_fn, optimizer = build_loss(cfg), build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    views = [
        torch.randn(2, args.batch, 3, 224, 224, device=env.device),
        torch.randn(6, args.batch, 3, 98, 98, device=env.device),
    ]
    torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(model, loss_fn, optimizer, scheduler, views, step, autocast)
        torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_time = statistics.median(times)
    flops = flops_per_sample(model_shape(cfg), cfg) * args.batch
    tflops = flops / step_time / 1e12
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model, optimizer
    torch.cuda.empty_cache()
    return (
        f"| {name} | {args.batch} | {args.ac} | {step_time * 1e3:.0f} ms | {args.batch / step_time:.1f} | "
        f"{tflops:.0f} | **{100 * tflops / args.peak_tflops:.1f}%** | {peak:.1f} GiB |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="vit_large_patch14_224,vit_huge_patch14_224")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--ac", default="none", choices=("none", "selective", "full"))
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no GPU visible: nothing measured")
        return 0
    env = init_distributed("cuda")
    if env.is_main:
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, world size {env.world_size}")
        print("| model | batch/GPU | AC | step | images/s/GPU | TFLOP/s | MFU | peak memory |")
        print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        row = bench(name, args, env)
        if env.is_main:
            print(row, flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
