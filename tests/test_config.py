from pathlib import Path

import pytest

from lejepa_scale.config import ConfigError, from_yaml, load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.stepz.*Did you mean: 'steps'"):
        load_config(None, ["run.dir=x", "train.stepz=3"])


def test_unknown_key_in_yaml_names_the_key(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("run: {dir: x}\noptim: {learning_rate: 0.1}\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
        load_config(recipe)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        load_config(None, ["run.dir=x", "train.batch_size=big"])


def test_bad_value_names_the_key():
    with pytest.raises(ConfigError, match=r"loss\.integration"):
        load_config(None, ["run.dir=x", "loss.integration=simpson"])


def test_missing_required_key():
    with pytest.raises(ConfigError, match=r"run\.dir"):
        load_config(None, [])


def test_override_that_is_not_key_value():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["run.dir=x", "train.steps"])


def test_overrides_win_over_recipe_and_types_are_kept():
    cfg = load_config(CONFIGS[0], ["train.steps=7", "loss.lam=0.1", "views.global_scale=[0.5,1.0]"])
    assert cfg.train.steps == 7 and cfg.loss.lam == 0.1
    assert cfg.views.global_scale == (0.5, 1.0)


@pytest.mark.parametrize("recipe", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_recipe_loads(recipe):
    cfg = load_config(recipe)
    assert cfg.run.dir and cfg.model.name


def test_renamed_keys_name_their_new_place(tmp_path):
    with pytest.raises(ConfigError, match=r"views\.blur_p is now views\.photometric\.blur_p"):
        load_config("configs/demo_cpu_vit.yaml", ["run.dir=x", "views.blur_p=0.1"])
    recipe = tmp_path / "old.yaml"
    recipe.write_text("run: {dir: x}\nviews: {hue: 0.0, n_local: 2}\n")
    with pytest.raises(ConfigError, match=r"views\.hue is now views\.photometric\.hue"):
        load_config(recipe)
    assert load_config(None, ["run.dir=x", "views.photometric.blur_p=0.1"]).views.photometric.blur_p == 0.1
    with pytest.raises(ConfigError, match=r"train\.float8 is now parallel\.float8"):
        load_config(None, ["run.dir=x", "train.float8=true"])
    with pytest.raises(ConfigError, match=r"eval\.probe_epochs is now demo\.probe_epochs"):
        load_config(None, ["run.dir=x", "eval.probe_epochs=3"])


def test_configs_saved_before_the_rename_still_load():
    """Run dirs and checkpoints keep the config they were written with."""
    saved = "run:\n  dir: x\nviews:\n  blur_p: 0.25\n  flip_p: 0.4\n"
    cfg = from_yaml(saved)
    assert cfg.views.photometric.blur_p == 0.25 and cfg.views.flip_p == 0.4
    saved = "run: {dir: x}\ntrain: {float8: true, float8_all_gather: null}\neval: {probe_epochs: 3}\n"
    cfg = from_yaml(saved)
    assert cfg.parallel.float8 and cfg.parallel.float8_all_gather is None and cfg.demo.probe_epochs == 3


def test_shards_with_a_built_in_source_is_an_error_naming_data_source():
    with pytest.raises(ConfigError, match=r"data\.source .*set data\.source=shards"):
        load_config("configs/demo_cpu_vit.yaml", ["run.dir=x", "data.train=/data/shards"])


def test_a_dict_override_replaces_the_recipes_dict():
    resnet = ["run.dir=x", "model.name=resnet10t", "model.backbone_kwargs={}"]
    cfg = load_config("configs/demo_cpu_vit.yaml", resnet)
    assert cfg.model.backbone_kwargs == {}
    cfg = load_config("configs/demo_cpu_vit.yaml", ["run.dir=x", "model.backbone_kwargs=null"])
    assert cfg.model.backbone_kwargs == {}
    cfg = load_config("configs/demo_cpu_vit.yaml", ["run.dir=x", "model.backbone_kwargs.depth=2"])
    assert cfg.model.backbone_kwargs == {"patch_size": 4, "embed_dim": 128, "depth": 2, "num_heads": 4}
