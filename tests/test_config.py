from pathlib import Path

import pytest

from lejepa_scale.config import ConfigError, load_config

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
