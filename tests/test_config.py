"""Every YAML under conf/ composes against its schema with Hydra's compose API."""


import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from spd.config import CONF_DIR, InfoApp, ModelConfig, RunApp, as_dataclass
from spd.load import load_config

PRIMARY = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
GROUPED = sorted((p.parent.name, p.stem) for p in CONF_DIR.glob("*/*.yaml") if p.parent.name != "experiment")


@pytest.fixture(autouse=True)
def hydra_conf():
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        yield


def values(node, prefix=""):
    """(dotted key, value) of every leaf a YAML file sets (its defaults list and hydra section left out)."""
    if OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=False)
    for k, v in node.items():
        if k in ("defaults", "hydra"):
            continue
        if isinstance(v, dict):
            yield from values(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _get(cfg, key):
    v = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(v) if OmegaConf.is_config(v) else v


@pytest.mark.parametrize("name", PRIMARY)
def test_primary_configs_compose_with_their_values(name):
    cfg = compose(name)
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    own = list(values(OmegaConf.load(CONF_DIR / f"{name}.yaml")))
    for key, value in own:  # every value the file sets is what the composed config holds (none silently lost)
        if not (isinstance(value, str) and "${" in value):
            assert OmegaConf.to_container(cfg, resolve=True) and _get(cfg, key) == value, key
    assert isinstance(as_dataclass(cfg), (RunApp, InfoApp)) and resolved


@pytest.mark.parametrize("group,name", GROUPED)
def test_group_configs_compose_with_their_values(group, name):
    cfg = compose("rank", overrides=[f"{group}={name}"])
    node = OmegaConf.load(CONF_DIR / group / f"{name}.yaml")
    own = {k for k, _ in values(OmegaConf.load(CONF_DIR / "rank.yaml"))}  # rank.yaml's own values win
    for key, value in values(node):
        if f"{group}.{key}" not in own:
            assert _get(cfg, f"{group}.{key}") == value, key
    schema = type(getattr(as_dataclass(cfg), group))
    assert schema.__name__.endswith("Config")  # typed by its dataclass, not a plain dict


def test_unknown_key_is_rejected():
    with pytest.raises(Exception, match="hidden_sise"):
        compose("rank", overrides=["model.hidden_sise=3"])


@pytest.mark.parametrize("name", ["llama2_7b", "llama2_13b", "llama2_70b", "llama3_8b"])
def test_large_models_have_random_shapes_and_a_checkpoint(name):
    cfg = as_dataclass(compose("rank", overrides=[f"model={name}"]))
    assert isinstance(cfg.model, ModelConfig) and cfg.model.source == "random" and "/" in cfg.model.path
    config = load_config(cfg.model)
    assert config.num_hidden_layers == cfg.model.num_layers


def test_quick_experiment_composes_onto_any_command():
    for name in ("study", "plan", "rank"):
        cfg = as_dataclass(compose(name, overrides=["+experiment=quick"]))
        assert (cfg.model.name, cfg.calib.data, cfg.parallel.tp, cfg.calib.num_samples) == (
            "stories260k", "tinystories_val.jsonl", 2, 8)
        assert cfg.eval.tasks == ["spd_tinystories", "spd_tinystories_cloze"] and cfg.ppl.preprocess is None


@pytest.mark.parametrize("arg, hint", [
    ("bench.fsue=false", "bench has no 'fsue'; valid: "), ("distil.lr=1", "the top level has no 'distil'"),
    ("model.hidden_sise=3", "model has no 'hidden_sise'")])
def test_unknown_settings_fail_with_the_valid_names(arg, hint):
    from spd.config import check_overrides
    from spd.errors import SPDError

    with pytest.raises(SPDError, match=hint) as e:
        check_overrides([arg], RunApp)
    assert "fuse" in str(e.value) or "distill" in str(e.value) or "hidden_size" in str(e.value)
    check_overrides(["bench.fuse=false", "model=tiny", "+experiment=quick", "hydra.run.dir=x", "-m",
                     "hydra/launcher=joblib", "distill.lr=1e-3", "eval.tasks=[a]"], RunApp)  # all valid


def test_calib_auto_resolves_by_device_before_anything_is_keyed():
    from dataclasses import asdict, replace

    from spd.artifacts import key_of
    from spd.calibration import AUTO_SIZES, resolve_auto_, resolve_calib, window_coverage

    cfg = as_dataclass(compose("study"))  # calib=auto is the default
    assert (cfg.calib.num_samples, cfg.calib.seq_len) == (None, None)
    cpu, gpu = resolve_calib(cfg.calib, "cpu"), resolve_calib(cfg.calib, "cuda:0")
    assert (cpu.num_samples, cpu.seq_len) == AUTO_SIZES["cpu"] == (16, 512)
    assert (gpu.num_samples, gpu.seq_len) == AUTO_SIZES["cuda"] == (128, 2048)
    assert key_of(asdict(cpu)) != key_of(asdict(gpu))  # a CPU and a GPU run never share an artifact
    assert resolve_calib(replace(cfg.calib, num_samples=32), "cuda").num_samples == 32  # a set size is kept
    cfg.model.device = "cpu"
    assert resolve_auto_(cfg).calib == cpu and resolve_auto_(cfg).calib == cpu  # idempotent
    note = window_coverage(100, [0, 50, 60], 40)
    assert note["distinct"] == 90 and "overlap" in note["note"] and "note" not in window_coverage(100, [0, 50], 40)
