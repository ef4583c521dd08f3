"""FSDP2 / HSDP training on real gloo ranks equals single-process training on the same global batch.

Each rank gets its slice of the same global batch; after 3 AdamW steps (fp32, drop path 0) the
loss (averaged over ranks, as the prediction term is a per-rank mean) and every parameter must
equal single-process training within 1e-5. This covers SIGReg's global statistic and the
projector's global BatchNorm.
"""

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from lejepa_scale.config import load_config
from lejepa_scale.distributed.parallel import full_state_dict, parallelize
from lejepa_scale.distributed.process_groups import DistEnv, init_distributed
from lejepa_scale.method.model import LeJEPAModel
from lejepa_scale.training.build import (
    build_loss,
    build_model,
    build_optimizer,
    build_parallel_model,
    build_scheduler,
)
from lejepa_scale.training.step import train_step
from tests.distributed import run_ranks
from tests.helpers import metrics, run_train

PER_RANK, STEPS = 4, 3


def tiny_config(*overrides):
    # Some gradients are identically zero: the key bias (softmax is shift-invariant) and the final
    # LayerNorm bias (the projector's BatchNorm removes any shift). AdamW with eps 1e-8 turns their
    # float noise (~1e-8) into steps of up to lr in any two runs, sharded or not; with eps 1e-6 and
    # lr 1e-4 that noise moves parameters by ~1e-6, while real gradients move them by ~1e-4.
    return load_config(
        None,
        [
            "run.dir=unused",
            "model.name=vit_tiny_patch16_224",
            "model.backbone_kwargs={patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}",
            "model.proj_hidden_dim=32",
            "model.proj_dim=16",
            "views.global_size=16",
            "views.local_size=8",
            "views.n_local=2",
            "loss.num_slices=64",
            "train.precision=fp32",
            "train.device=cpu",
            "optim.lr=1e-4",
            "optim.eps=1e-6",
            *overrides,
        ],
    )


def global_batches(world_size):
    gen = torch.Generator().manual_seed(42)
    n = PER_RANK * world_size
    return [
        [torch.randn(2, n, 3, 16, 16, generator=gen), torch.randn(2, n, 3, 8, 8, generator=gen)]
        for _ in range(STEPS)
    ]


def run_training(cfg, model, rank, world_size):
    loss_fn = build_loss(cfg)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")
    losses = []
    model.train()
    for step, views in enumerate(global_batches(world_size)):
        mine = views if rank is None else [v[:, rank * PER_RANK : (rank + 1) * PER_RANK] for v in views]
        result = train_step(
            model, loss_fn, optimizer, scheduler, mine, step, autocast, clip_grad=cfg.optim.clip_grad
        )
        assert not result.skipped
        losses.append(result.loss.total.item())
    return losses, full_state_dict(model)


def single_process(world_size, *overrides):
    cfg = tiny_config(*overrides)
    return run_training(cfg, build_model(cfg), None, world_size)  # the whole global batch


def ranks_worker(rank, world_size, variants):
    results = {}
    for name, overrides, mesh_shape in variants:
        cfg = tiny_config(*overrides)
        env = init_distributed("cpu")
        if mesh_shape is None:
            model = build_parallel_model(cfg, env)
        else:
            mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("dp_replicate", "dp_shard"))
            model = parallelize(lambda cfg=cfg: build_model(cfg), env, mesh, param_dtype=cfg.train.precision)
        assert all(isinstance(p, DTensor) for p in model.parameters())
        results[name] = run_training(cfg, model, rank, world_size)
    return results


def assert_same_training(rank_results, reference, tol=1e-5):
    ref_losses, ref_state = reference
    mean_losses = torch.tensor([r[0] for r in rank_results]).mean(0)
    torch.testing.assert_close(mean_losses, torch.tensor(ref_losses), rtol=tol, atol=tol)
    state = rank_results[0][1]  # the full state dict lives on rank 0
    assert state.keys() == ref_state.keys()
    for key, value in ref_state.items():
        torch.testing.assert_close(
            state[key], value, rtol=tol, atol=tol, msg=lambda m, key=key: f"{key}: {m}"
        )


def test_fsdp_hsdp_and_ac_on_two_ranks_equal_single_process():
    variants = [
        ("fsdp", [], None),
        ("fsdp_full_ac", ["parallel.activation_checkpointing=full"], None),
        ("fsdp_selective_ac", ["parallel.activation_checkpointing=selective", "parallel.ac_every=2"], None),
        ("fsdp_op_ac", ["parallel.activation_checkpointing=op"], None),
        ("hsdp_2x1", ["parallel.dp_replicate=2"], None),
        ("hsdp_1x2", [], (1, 2)),
    ]
    reference = single_process(2)
    results = run_ranks(ranks_worker, 2, variants)
    for name, _, _ in variants:
        assert_same_training([r[name] for r in results], reference)
    # activation checkpointing changes memory, not numbers: bitwise equal to no AC
    for name in ("fsdp_full_ac", "fsdp_selective_ac", "fsdp_op_ac"):
        assert results[0][name][0] == results[0]["fsdp"][0]
        assert all(torch.equal(results[0][name][1][k], v) for k, v in results[0]["fsdp"][1].items())


def test_fsdp_on_four_ranks_equals_single_process():
    results = run_ranks(ranks_worker, 4, [("fsdp", [], None)])
    assert_same_training([r["fsdp"] for r in results], single_process(4))


def test_compile_and_clipping_on_two_ranks_equal_single_process_and_float8_stays_close():
    variants = [
        ("compiled", ["parallel.compile=true"], None),
        ("clipped", ["optim.clip_grad=0.01"], None),
        ("float8", ["parallel.float8=true"], None),  # torchao's emulation on CPU
    ]
    results = run_ranks(ranks_worker, 2, variants)
    reference = single_process(2)
    assert_same_training([r["compiled"] for r in results], reference, tol=1e-4)
    clipped = single_process(2, "optim.clip_grad=0.01")
    assert_same_training([r["clipped"] for r in results], clipped)
    assert not torch.equal(clipped[1]["backbone.cls_token"], reference[1]["backbone.cls_token"])  # it clipped
    losses, state = results[0]["float8"]
    assert state.keys() == reference[1].keys()  # float8 Linears keep their parameter names
    mean_losses = torch.tensor([r["float8"][0] for r in results]).mean(0)
    torch.testing.assert_close(mean_losses, torch.tensor(reference[0]), rtol=0.05, atol=0)


def test_bf16_run_completes_and_stays_finite():
    results = run_ranks(ranks_worker, 2, [("bf16", ["train.precision=bf16"], None)])
    losses, state = results[0]["bf16"]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def vit_g_init_worker(rank, world_size):
    env = DistEnv(rank, world_size, 0, torch.device("cpu"))
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp_shard",))

    def build():  # ViT-G/14 blocks (width 1664, MLP 8192, 16 heads) at depth 2 to fit CI memory
        torch.manual_seed(0)
        return LeJEPAModel(
            "vit_gigantic_patch14_224",
            img_size=56,
            proj_hidden_dim=64,
            proj_dim=16,
            backbone_kwargs={"depth": 2},
        )

    model = parallelize(build, env, mesh, param_dtype="fp32")
    shards = {n: p.to_local().clone() for n, p in model.named_parameters()}
    # the full 48-block ViT-G/14 shards on the meta device without allocating anything
    with torch.device("meta"):
        full = LeJEPAModel("vit_gigantic_patch14_224", proj_hidden_dim=64, proj_dim=16)
    total = sum(p.numel() for p in full.backbone.parameters())
    from lejepa_scale.distributed.parallel import apply_fsdp

    apply_fsdp(full, mesh, "bf16", "fp32", True)
    local = sum(p.to_local().numel() for p in full.backbone.parameters())
    return full_state_dict(model), shards, total, local


def test_meta_device_vit_g_sharded_init_is_rank_consistent():
    results = run_ranks(vit_g_init_worker, 2)
    gathered, (_, shards0, total, local0), (_, shards1, _, local1) = results[0][0], results[0], results[1]
    torch.manual_seed(0)
    eager = LeJEPAModel(
        "vit_gigantic_patch14_224", img_size=56, proj_hidden_dim=64, proj_dim=16, backbone_kwargs={"depth": 2}
    ).state_dict()
    for key, value in eager.items():
        assert torch.equal(gathered[key], value), key
    weight = "backbone.blocks.0.mlp.fc1.weight"
    assert not torch.equal(shards0[weight], shards1[weight])  # ranks hold different halves
    assert 1.80e9 < total < 1.88e9 and local0 + local1 == total and abs(local0 - local1) < total * 0.01


@pytest.mark.parametrize("bad", ["parallel.dp_replicate=0", "parallel.activation_checkpointing=some"])
def test_parallel_config_errors_name_the_key(bad):
    from lejepa_scale.config import ConfigError

    with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
        tiny_config(bad)


def test_trainer_under_torchrun_with_two_ranks(tmp_path):
    """The real entry point: torchrun, gloo, the demo recipe; only rank 0 writes."""
    overrides = ["train.steps=3", "train.batch_size=16", "train.log_every=1", "loss.num_slices=64",
                 "parallel.activation_checkpointing=full"]  # fmt: skip
    run_train(tmp_path, *overrides, nproc=2, timeout=300)
    records = metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2]  # one writer
    assert records[0]["img_per_s"] == pytest.approx(2 * records[0]["img_per_s_per_rank"])
    cfg = load_config("configs/demo_cpu_vit.yaml", [f"run.dir={tmp_path}"])
    build_model(cfg).load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))


def test_compiled_blocks_give_the_same_loss_and_checkpoint_keys():
    cfg = tiny_config()
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    compiled = parallelize(lambda: build_model(cfg), env, None, compile=True)
    eager = build_model(cfg)
    views = [torch.randn(2, 4, 3, 16, 16), torch.randn(2, 4, 3, 8, 8)]
    loss_fn = build_loss(cfg)
    a, b = (loss_fn(m(*views).z_global, m(*views).z_local, 0).total for m in (compiled, eager))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert full_state_dict(compiled).keys() == eager.state_dict().keys()
