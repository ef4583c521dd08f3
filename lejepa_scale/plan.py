"""`python -m lejepa_scale.plan --config FILE --nodes 16 --gpus-per-node 8 --gpu-mem 80`: per-GPU
memory and FLOPs of one LeJEPA step before anything is launched, and the largest per-GPU batch and
activation-checkpointing setting that fit.

The model is built on the meta device (no memory) to read its shape. Memory per GPU, for FSDP2
sharding over `shard` ranks (the GPUs of a node under HSDP, all GPUs under FSDP):

* parameters, fp32 master copy, sharded: 4 P / shard; gradients (reduce dtype) and AdamW's two
  fp32 moments likewise sharded;
* communication buffers: the gathered compute-dtype parameters of two blocks (the one running and
  the one prefetched) plus one block's unsharded gradients before its reduce-scatter;
* activations saved for backward, per block and token: 8 D + 2 H elements for a timm ViT block
  (D width, H MLP width; measured with saved-tensor hooks: LayerNorm inputs, qkv, q/k/v and the
  attention output, projection and MLP inputs), at 4 bytes in fp32 and 2 bytes plus the fp32
  LayerNorm and residual tensors (6 D more bytes) under bf16; a checkpointed block keeps only its
  input (D elements) and recomputes one block at a time in backward; with op-level selective
  checkpointing (torchtitan's SAC, `op`) a block keeps 7 D + H elements (its input, the outputs of
  its four matmuls and of GPU attention; CPU attention is recomputed, so on CPU it keeps D less);
* a fixed allowance for the CUDA context and allocator fragmentation (`--reserve`).

FLOPs come from the trainer's FLOPs model (`lejepa_scale.training.flops`).

Communication per step and rank, as the buffers the collectives take or give (what FSDP2 pads
each parameter's first dimension to a multiple of the shard degree for included):
* all-gather: each block's parameters in the compute dtype twice (forward, backward: both crop
  sizes in one call), the root's once (it stays gathered from forward to backward); with K
  micro-batches, each block 3 K times (the features-only pass, then forward and backward);
* reduce-scatter: every parameter's gradient in the reduce dtype once per backward;
* all-reduce: under HSDP the sharded gradients across replicas once per backward; SIGReg's
  cos/sin sums (forward and backward), the two global BatchNorms' moments (forward and backward),
  the online probe's gradients.
Their time at the stated bandwidths (ring collectives: a rank moves (n - 1) / n of an all-gather's
or reduce-scatter's buffer and twice that of an all-reduce's), next to the compute time at the
assumed MFU, decides `parallel.dp_replicate`: FSDP over every GPU moves its gathers over the
network between nodes, HSDP keeps them on NVLink and sends only the gradient all-reduce across.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch

from lejepa_scale.config import Config, ConfigError, load_config
from lejepa_scale.training.build import build_model
from lejepa_scale.training.flops import ModelShape, flops_per_sample, view_tokens

GiB = 2**30


def model_shape(cfg: Config) -> ModelShape:
    """The recipe's model shape, built on the meta device (no memory); ValueError if not a ViT."""
    with torch.device("meta"):
        return ModelShape.of(build_model(cfg), cfg)


def activation_bytes(
    shape: ModelShape, cfg: Config, batch: int, ac: str, ac_every: int = 2
) -> tuple[float, float]:
    """(saved for backward, rebuilt during backward) in bytes: what the blocks keep (all their
    tensors; only their input when checkpointed; with op-level SAC their input and the outputs of
    the matmuls and of attention), the embedding/final-norm tensors and input images, the
    projector; plus, with checkpointing, what one block rebuilds for the largest forward."""
    d, h = shape.width, shape.mlp_hidden
    bf16 = cfg.train.precision == "bf16"
    elem = 2 if bf16 else 4
    per_token = (2 * (8 * d + 2 * h) + 6 * d) if bf16 else 4 * (8 * d + 2 * h)
    op_token = elem * (7 * d + h)  # input d, qkv 3d, attention d, projection d, MLP h and d
    checkpointed = {"none": 0, "op": 0, "full": shape.depth, "selective": math.ceil(shape.depth / ac_every)}[
        ac
    ]
    kept = shape.depth - checkpointed
    block_bytes = shape.depth * op_token if ac == "op" else kept * per_token + checkpointed * d * elem
    per_view = view_tokens(shape, cfg)
    tokens = sum(views * t for views, t in per_view) * batch
    saved = tokens * (block_bytes + 2 * d * elem)  # + patch/pos embed, final norm
    sizes = [(cfg.views.n_global, cfg.views.global_size), (cfg.views.n_local, cfg.views.local_size)]
    saved += sum(n * batch * 3 * size * size * 4 for n, size in sizes)  # the input images (fp32)
    saved += (
        sum(v for v, _ in per_view) * batch * (3 * shape.proj_hidden + 2 * shape.proj_dim) * 4
    )  # projector
    largest = max(views * t for views, t in per_view) * batch
    recompute = largest * (per_token - op_token if ac == "op" else per_token if checkpointed else 0.0)
    return saved, recompute


@dataclass
class Plan:
    batch: int
    ac: str
    shard: int
    params: float
    grads: float
    optimizer: float
    comm: float
    activations: float  # saved for backward
    recompute: float  # one checkpointed block rebuilt during backward
    reserve: float
    flops_per_step: float

    @property
    def total(self) -> float:
        return (
            self.params
            + self.grads
            + self.optimizer
            + self.comm
            + self.activations
            + self.recompute
            + self.reserve
        )


def make_plan(
    shape: ModelShape, cfg: Config, *, shard: int, batch: int, ac: str, reserve_gib: float = 2.0
) -> Plan:
    compute_bytes = 2 if cfg.train.precision == "bf16" else 4
    reduce_bytes = 2 if cfg.parallel.reduce_dtype == "bf16" else 4
    comm = 0.0 if shard == 1 else shape.block_params * (2 * compute_bytes + reduce_bytes)
    saved, recompute = activation_bytes(shape, cfg, batch, ac, cfg.parallel.ac_every)
    return Plan(
        batch=batch,
        ac=ac,
        shard=shard,
        params=4 * shape.params / shard,
        grads=reduce_bytes * shape.params / shard,
        optimizer=8 * shape.params / shard,
        comm=comm,
        activations=saved,
        recompute=recompute,
        reserve=reserve_gib * GiB,
        flops_per_step=flops_per_sample(shape, cfg) * batch,
    )


def largest_batch(
    shape: ModelShape, cfg: Config, *, shard: int, ac: str, budget: float, reserve_gib: float
) -> int:
    """Largest per-GPU batch whose plan fits `budget` bytes (0 if none does)."""
    lo, hi = 0, 1
    while make_plan(shape, cfg, shard=shard, batch=hi, ac=ac, reserve_gib=reserve_gib).total <= budget:
        lo, hi = hi, hi * 2
        if hi > 1 << 16:
            break
    while hi - lo > 1:
        mid = (lo + hi) // 2
        fits = make_plan(shape, cfg, shard=shard, batch=mid, ac=ac, reserve_gib=reserve_gib).total <= budget
        lo, hi = (mid, hi) if fits else (lo, mid)
    return lo


HARDWARE = {"nodes": 1, "gpus_per_node": 8, "gpu_mem": 80.0}  # what is assumed unless given


def padded(shapes: tuple[tuple[int, ...], ...], shard: int) -> int:
    """Elements FSDP2 gathers for parameters of these shapes over `shard` ranks: each one's first
    dimension padded to a multiple of the shard degree."""
    return sum(math.ceil(s[0] / shard) * shard * math.prod(s[1:]) if s else shard for s in shapes)


@dataclass
class Communication:
    """Bytes of one step's collectives on one rank (the buffers: all-gather output, reduce-scatter
    input, all-reduce tensor), by kind, and the share of each that crosses nodes."""

    all_gather: float
    reduce_scatter: float
    all_reduce: float  # the gradient all-reduce across replicas plus the small statistics
    replica_all_reduce: float  # of which: HSDP's gradient all-reduce


def communication(
    shape: ModelShape, cfg: Config, *, shard: int, replicas: int, accumulation: int = 1, num_classes: int = 0
) -> Communication:
    """One step's collective buffers on one rank under FSDP over `shard` ranks and `replicas` HSDP
    replicas (see the module docstring)."""
    compute = 2 if cfg.train.precision == "bf16" else 4
    reduce = 2 if cfg.parallel.reduce_dtype == "bf16" else 4
    blocks, root = shape.depth * padded(shape.block_shapes, shard), padded(shape.root_shapes, shard)
    gathers = 2 if accumulation == 1 else 3 * accumulation
    gathered = (
        (blocks * gathers + root * (1 if accumulation == 1 else 1 + accumulation)) * compute
        if shard > 1
        else 0
    )
    scattered = (blocks + root) * reduce * accumulation if shard > 1 else 0
    across = (blocks + root) // shard * reduce * accumulation if replicas > 1 else 0
    views = cfg.views.n_global + cfg.views.n_local
    sigreg = 2 * (2 * views * cfg.loss.num_slices * cfg.loss.knots + 1) * 4  # forward and backward
    batch_norm = 2 * 2 * (2 * shape.proj_hidden + 1) * 4  # two layers, forward and backward
    probe = (shape.width * num_classes + num_classes + 2 * shape.width) * 4 if num_classes else 0
    statistics = sigreg + batch_norm + probe if shard * replicas > 1 else 0
    return Communication(gathered, scattered, across + statistics, across)


@dataclass
class Network:
    """What one GPU sends and receives per second (GB/s): to GPUs of its node, to other nodes."""

    nvlink: float
    inter_node: float


def communication_seconds(comm: Communication, *, shard: int, replicas: int, gpus_per_node: int,
                          network: Network) -> tuple[float, float]:  # fmt: skip
    """(seconds within nodes, seconds between nodes) of a step's collectives on ring algorithms."""
    world = shard * replicas
    ring = (comm.all_gather + comm.reduce_scatter) * (shard - 1) / max(1, shard)
    statistics = 2 * (comm.all_reduce - comm.replica_all_reduce) * (world - 1) / max(1, world)
    replica = 2 * comm.replica_all_reduce * (replicas - 1) / max(1, replicas)
    sharded_across_nodes = shard > gpus_per_node
    inside = 0.0 if sharded_across_nodes else ring / (network.nvlink * 1e9)
    between = (
        (ring if sharded_across_nodes else 0.0) + replica + (statistics if world > gpus_per_node else 0.0)
    )
    inside += 0.0 if world > gpus_per_node else statistics / (network.nvlink * 1e9)
    return inside, between / (network.inter_node * 1e9)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lejepa_scale.plan",
        description="Per-GPU memory and FLOPs of one LeJEPA step, and the largest batch and activation "
        "checkpointing that fit, before anything is launched.",
    )
    parser.add_argument("--config", required=True, help="recipe YAML (configs/*.yaml)")
    parser.add_argument("--nodes", type=int, help=f"default {HARDWARE['nodes']}")
    parser.add_argument("--gpus-per-node", type=int, help=f"default {HARDWARE['gpus_per_node']}")
    parser.add_argument("--gpu-mem", type=float, help=f"GiB per GPU, default {HARDWARE['gpu_mem']:g}")
    parser.add_argument("--reserve", type=float, default=2.0, help="GiB for CUDA context and fragmentation")
    parser.add_argument(
        "--nvlink-gbs",
        type=float,
        default=350.0,
        help="GB/s a GPU moves to the GPUs of its node (default 350: H100/H200 NVLink in NCCL)",
    )
    parser.add_argument(
        "--network-gbs",
        type=float,
        default=40.0,
        help="GB/s a GPU moves to other nodes (default 40: one 400 Gb/s NIC per GPU)",
    )
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the compute time")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 TFLOP/s (989: H100 SXM)")
    parser.add_argument("--classes", type=int, default=1000, help="labels the online probe classifies")
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = parser.parse_args(argv)
    assumed = [f"--{k.replace('_', '-')} {v:g}" for k, v in HARDWARE.items() if getattr(args, k) is None]
    for key, value in HARDWARE.items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    if assumed:
        print(f"assuming {' '.join(assumed)} (not given)")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    world = args.nodes * args.gpus_per_node
    shard = args.gpus_per_node if cfg.parallel.dp_replicate > 1 else world
    try:
        shape = model_shape(cfg)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    plan = make_plan(
        shape,
        cfg,
        shard=shard,
        batch=cfg.train.batch_size,
        ac=cfg.parallel.activation_checkpointing,
        reserve_gib=args.reserve,
    )
    print(
        f"{cfg.model.name}: {shape.params / 1e9:.3f} B parameters ({shape.depth} blocks, "
        f"width {shape.width}, MLP {shape.mlp_hidden}), {world} GPUs, FSDP shard degree {shard}"
    )
    print(f"per GPU at batch {plan.batch}, activation checkpointing '{plan.ac}', {cfg.train.precision}:")
    for name in ("params", "grads", "optimizer", "comm", "activations", "recompute", "reserve"):
        print(f"  {name:<12} {getattr(plan, name) / GiB:8.2f} GiB")
    verdict = "fits" if plan.total <= args.gpu_mem * GiB else "DOES NOT FIT"
    print(f"  {'total':<12} {plan.total / GiB:8.2f} GiB of {args.gpu_mem:g} GiB: {verdict}")
    print(
        f"  model FLOPs per step: {plan.flops_per_step / 1e12:.2f} TFLOP per GPU "
        f"({plan.flops_per_step * world / 1e15:.2f} PFLOP for the global batch of {plan.batch * world})"
    )
    print("largest per-GPU batch that fits:")
    fits = {}
    for ac in ("none", "op", "selective", "full"):
        fits[ac] = largest_batch(
            shape, cfg, shard=shard, ac=ac, budget=args.gpu_mem * GiB, reserve_gib=args.reserve
        )
        print(f"  activation_checkpointing={ac:<10} batch {fits[ac]}")
    wanted = cfg.train.batch_size
    enough = [ac for ac, b in fits.items() if b >= wanted]
    if enough:  # the least recomputation that runs the recipe's batch
        print(
            f"recommendation: parallel.activation_checkpointing={enough[0]} with train.batch_size={wanted} "
            f"(fits up to {fits[enough[0]]})"
        )
    elif fits["full"]:
        print(
            f"recommendation: parallel.activation_checkpointing=full with train.batch_size={fits['full']}; "
            f"the recipe's {wanted} does not fit"
        )
    else:
        print(
            "recommendation: nothing fits; shard over more GPUs (FSDP over all GPUs) or use a smaller model"
        )
    print_communication(shape, cfg, args, world)


def print_communication(shape: ModelShape, cfg: Config, args: argparse.Namespace, world: int) -> None:
    """Per step and rank: the collectives' bytes and times under FSDP over all GPUs and under HSDP
    with a replica per node, against the compute time; the dp_replicate that spends least."""
    network, nodes, per_node = Network(args.nvlink_gbs, args.network_gbs), args.nodes, args.gpus_per_node
    compute = flops_per_sample(shape, cfg) * cfg.train.batch_size / (args.mfu * args.peak_tflops * 1e12)
    print(
        f"communication per step and GPU (NVLink {args.nvlink_gbs:g} GB/s, between nodes "
        f"{args.network_gbs:g} GB/s per GPU; compute {compute:.2f} s at {100 * args.mfu:g} % of "
        f"{args.peak_tflops:g} TFLOP/s):"
    )
    header = ("dp_replicate", "all-gather", "reduce-sc.", "all-reduce", "in node", "between", "memory")
    print("  " + "".join(f"{h:>13}" for h in header))
    candidates = {}
    for replicas in sorted({1, nodes}):
        shard = world // replicas
        comm = communication(shape, cfg, shard=shard, replicas=replicas, num_classes=args.classes)
        inside, between = communication_seconds(
            comm, shard=shard, replicas=replicas, gpus_per_node=per_node, network=network
        )
        ac = cfg.parallel.activation_checkpointing
        memory = make_plan(
            shape, cfg, shard=shard, batch=cfg.train.batch_size, ac=ac, reserve_gib=args.reserve
        )
        fits = memory.total <= args.gpu_mem * GiB
        candidates[replicas] = (inside + between, fits)
        sizes = [f"{b / GiB:.2f} GiB" for b in (comm.all_gather, comm.reduce_scatter, comm.all_reduce)]
        cells = [
            str(replicas),
            *sizes,
            f"{inside:.2f} s",
            f"{between:.2f} s",
            f"{memory.total / GiB:.1f} GiB",
        ]
        print("  " + "".join(f"{c:>13}" for c in cells) + ("" if fits else "  (does not fit)"))
    fitting = {r: seconds for r, (seconds, fits) in candidates.items() if fits}
    if not fitting:
        print("recommendation: no dp_replicate fits the memory; see the batch and checkpointing above")
        return
    best = min(fitting, key=lambda r: (fitting[r], -r))
    kind = "FSDP over all GPUs" if best == 1 else f"HSDP, a replica per node of {world // best} GPUs"
    hidden = "less than" if fitting[best] <= compute else "more than"
    print(
        f"recommendation: parallel.dp_replicate={best} ({kind}): {fitting[best]:.2f} s of communication "
        f"per step, {hidden} the {compute:.2f} s of compute it overlaps with"
    )


if __name__ == "__main__":
    main()
