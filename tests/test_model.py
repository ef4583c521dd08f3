import torch

from lejepa_scale.method.model import LeJEPAModel, create_backbone


def test_vit_gigantic_on_meta_has_1_84b_parameters():
    with torch.device("meta"):
        backbone = create_backbone("vit_gigantic_patch14_224", img_size=224)
    n = sum(p.numel() for p in backbone.parameters())
    assert backbone.embed_dim == 1664 and len(backbone.blocks) == 48
    assert 1.80e9 < n < 1.88e9


def test_multi_resolution_forward_shapes():
    model = LeJEPAModel(
        "vit_tiny_patch16_224",
        img_size=32,
        proj_hidden_dim=64,
        proj_dim=16,
        backbone_kwargs=dict(patch_size=4, embed_dim=32, depth=2, num_heads=2),
    )
    out = model(torch.randn(2, 5, 3, 32, 32), torch.randn(4, 5, 3, 16, 16))
    assert out.features_global.shape == (2, 5, 32)
    assert out.z_global.shape == (2, 5, 16) and out.z_local.shape == (4, 5, 16)
    assert model.features(torch.randn(3, 3, 32, 32)).shape == (3, 32)
    # the same backbone at a third size: position embeddings are interpolated
    assert model.features(torch.randn(3, 3, 24, 24)).shape == (3, 32)


def test_any_timm_model_name_works_cnn_included():
    model = LeJEPAModel("resnet18", img_size=64, proj_hidden_dim=32, proj_dim=8)
    out = model(torch.randn(2, 3, 3, 64, 64), torch.randn(2, 3, 3, 32, 32))
    assert out.features_global.shape == (2, 3, 512) and out.z_local.shape == (2, 3, 8)


def test_projector_embedding_width():
    """0 (the default): the projector of earlier runs, same parameter names; 512: the official
    shape, Linear(D, 512) then the MLP 512 -> 2048 -> 2048 -> K."""
    vit = dict(patch_size=4, embed_dim=32, depth=1, num_heads=2)
    kwargs = dict(img_size=32, proj_hidden_dim=2048, proj_dim=64, backbone_kwargs=vit)
    plain = LeJEPAModel("vit_tiny_patch16_224", **kwargs)
    names = [n for n, _ in plain.projector.named_parameters()]
    assert names == ["0.weight", "1.weight", "1.bias", "3.weight", "4.weight", "4.bias", "6.weight", "6.bias"]
    official = LeJEPAModel("vit_tiny_patch16_224", proj_embed_dim=512, **kwargs)
    expected = (32 * 512 + 512) + 512 * 2048 + 2 * 2048 + 2048 * 2048 + 2 * 2048 + 2048 * 64 + 64
    assert sum(p.numel() for p in official.projector.parameters()) == expected
    assert official(torch.randn(2, 4, 3, 32, 32)).z_global.shape == (2, 4, 64)


def test_the_online_probe_starts_from_the_run_seed_on_every_rank():
    from lejepa_scale.config import load_config
    from lejepa_scale.distributed.process_groups import DistEnv
    from lejepa_scale.training.build import build_probe

    cfg = load_config("configs/demo_cpu.yaml", ["run.dir=x"])
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    heads = []
    for rank_stream in (1, 2):  # whatever the process's random stream, e.g. seeded per rank
        torch.manual_seed(rank_stream)
        heads.append(build_probe(cfg, 512, 10, env).head.state_dict())
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
