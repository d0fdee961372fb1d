"""Every YAML under conf/ composes against its schema with Hydra's compose API."""


import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from spd.config import CONF_DIR, ModelConfig, as_dataclass
from spd.load import load_config

PRIMARY = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
GROUPED = sorted((p.parent.name, p.stem) for p in CONF_DIR.glob("*/*.yaml"))


@pytest.fixture(autouse=True)
def hydra_conf():
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        yield


@pytest.mark.parametrize("name", PRIMARY)
def test_primary_configs_compose(name):
    cfg = compose(name)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


@pytest.mark.parametrize("group,name", GROUPED)
def test_group_configs_compose(group, name):
    cfg = as_dataclass(compose("rank", overrides=[f"{group}={name}"]))
    OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert getattr(cfg, group) is not None


def test_unknown_key_is_rejected():
    with pytest.raises(Exception, match="hidden_sise"):
        compose("rank", overrides=["model.hidden_sise=3"])


@pytest.mark.parametrize("name", ["llama2_7b", "llama2_13b", "llama2_70b", "llama3_8b"])
def test_large_models_have_random_shapes_and_a_checkpoint(name):
    cfg = as_dataclass(compose("rank", overrides=[f"model={name}"]))
    assert isinstance(cfg.model, ModelConfig) and cfg.model.source == "random" and "/" in cfg.model.path
    config = load_config(cfg.model)
    assert config.num_hidden_layers == cfg.model.num_layers
