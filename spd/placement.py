"""Big-model placement through accelerate: a model's blocks spread over GPUs, then the CPU, then disk.

`model.device_map` (spd.config.ModelConfig) picks it: null (the default) keeps the whole model on
`model.device`; `auto`, `balanced`, `balanced_low_0` or `sequential` let accelerate fill every visible GPU,
then the CPU, then disk, within `model.max_memory` (on the command line: `++model.max_memory={0: 120GiB,
cpu: 200GiB}`); a dict maps module names (model.layers.3, lm_head ...) to devices by hand. Decoder blocks
are never split.

What accelerate does: weights mapped to a GPU live there; weights mapped to `cpu` (when a GPU exists) or
`disk` are "offloaded": they stay in host memory or in files under a fresh folder, the parameters are left
on the meta device, and a hook loads each Linear's weights onto the execution device (the first GPU, or
the CPU on a machine without one) for its own call. A hook on every block moves its inputs to its device.

What spd adds, so that every stage runs on such a model:
  - SPD blocks keep the placement hook of the block they wrap and load an offloaded block whole before
    their forward (spd.block.onloaded): the per-rank emulation reads o_proj and MLP weights directly.
  - writable(block): the block's weights on its execution device, with the offload hooks paused, for code
    that changes them (head permutation, distillation, loading distilled blocks); on exit the new values are
    written back to host memory or to the offload files, then dropped from the device again.
Each offload gets its own folder, removed at exit: accelerate would otherwise read an earlier run's weights
from a folder that already holds an index.json.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from spd.block import offloaded_modules
from spd.errors import ModelLoadError

NO_SPLIT = ["LlamaDecoderLayer", "SPDDecoderLayer"]
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def max_memory_of(cfg) -> dict | None:
    """model.max_memory with GPU indices as ints ({"0": "80GiB"} in YAML -> {0: "80GiB"}), or None."""
    if not cfg.max_memory:
        return None
    return {int(k) if str(k).isdigit() else str(k): v for k, v in dict(cfg.max_memory).items()}


def device_map_for(model: nn.Module, cfg) -> dict | None:
    """The device map of model.device_map (cfg: ModelConfig) for this model (meta weights are enough)."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    spec = cfg.device_map
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec not in STRATEGIES:
            raise ModelLoadError(f"model.device_map={spec!r}; valid: null (one device: model.device), "
                                 f"{', '.join(STRATEGIES)}, or a mapping of module names to devices")
        mem = max_memory_of(cfg)
        if spec != "sequential":
            mem = get_balanced_memory(model, mem, no_split_module_classes=NO_SPLIT, low_zero=spec == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=mem, no_split_module_classes=NO_SPLIT)
        if device_map.get("") == "disk":  # accelerate offloads nothing under the name "": name the children
            device_map = {name: "disk" for name, _ in model.named_children()}
        return offload_front(device_map)
    names = {n for n, _ in model.named_modules()}
    unknown = sorted(k for k in dict(spec) if k and k not in names)
    if unknown:
        raise ModelLoadError(f"model.device_map names {', '.join(unknown)}, which the model does not have; "
                             "use module names such as model.embed_tokens, model.layers.0, model.norm, lm_head")
    return {k: int(v) if str(v).isdigit() else v for k, v in dict(spec).items()}


def offload_front(device_map: dict) -> dict:
    """The same map with its offloaded decoder blocks moved to the front of the model (blocks are equal in
    size, so every device keeps its load). A ranking step runs the blocks from the switched one to the last,
    so block j runs in j + 1 of L backward steps: offloaded blocks that stream over PCIe for every forward cost
    least at the front. Other stages run every block equally often."""
    blocks = sorted((k for k in device_map if k.startswith("model.layers.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if not blocks:
        return device_map
    rank = {"disk": 0, "cpu": 1}
    devices = sorted((device_map[k] for k in blocks), key=lambda d: rank.get(d, 2))  # stable: GPU order kept
    return {**device_map, **dict(zip(blocks, devices))}


def offload_folder(cfg) -> Path:
    """A fresh folder for this process's disk offload under model.offload_dir (default $SPD_CACHE/offload),
    removed at exit."""
    from spd.config import cache_dir

    base = Path(cfg.offload_dir).expanduser() if cfg.offload_dir else cache_dir() / "offload"
    base.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="spd-offload-", dir=base))
    atexit.register(shutil.rmtree, d, True)
    return d


def dispatch_(model: nn.Module, cfg, device_map: dict | None = None) -> nn.Module:
    """Place a model loaded on the CPU by cfg.device_map (ModelConfig), or by device_map when given."""
    from accelerate import dispatch_model

    device_map = device_map or device_map_for(model, cfg)
    if device_map is None:
        return model
    disk = "disk" in device_map.values()
    try:
        dispatch_model(model, device_map, offload_dir=offload_folder(cfg) if disk else None,
                       skip_keys=getattr(model, "_skip_keys_device_placement", None))
    except ValueError as e:
        raise ModelLoadError(f"model.device_map cannot place this model: {e}") from None
    model.hf_device_map = device_map  # what save_pretrained reads to find offloaded weights
    return model


def is_offloaded(model: nn.Module) -> bool:
    return bool(offloaded_modules(model))


def _store(weights_map, name: str, value: torch.Tensor) -> None:
    """Write a changed offloaded tensor back where accelerate's hook reads it from."""
    from accelerate.utils import offload_weight

    data, key = getattr(weights_map, "dataset", weights_map), getattr(weights_map, "prefix", "") + name
    host = getattr(data, "state_dict", data)
    if isinstance(host, dict) and key in host:
        host[key].copy_(value.detach().to(host[key].device, host[key].dtype))
    elif getattr(data, "save_folder", None) and key in getattr(data, "index", {}):
        offload_weight(value.detach().cpu().contiguous(), key, data.save_folder, data.index)
    else:
        raise ModelLoadError(f"cannot write the changed weight {key} back to its offload store "
                             f"({type(data).__name__}); place this block on a device instead (model.device_map)")


@contextmanager
def writable(module: nn.Module):
    """The module's offloaded weights on its execution device for code that changes them (no-op otherwise).

    The offload hooks are paused inside (forwards use the weights in place, optimisers keep their
    Parameters); on exit every weight is written back to its store and dropped from the device.
    """
    from accelerate.utils.modeling import named_module_tensors

    hooked = offloaded_modules(module)
    for m in hooked:
        m._hf_hook.pre_forward(m)
        m._hf_hook.offload = False
    try:
        yield module
    finally:
        for m in hooked:
            hook = m._hf_hook
            for name, t in named_module_tensors(m, include_buffers=hook.offload_buffers,
                                                recurse=hook.place_submodules, remove_non_persistent=True):
                _store(hook.weights_map, name, t)
            hook.offload = True
            hook.post_forward(m, None)


def placement_table(model: nn.Module) -> str:
    """Where each part of a dispatched model lives: device -> module count (for logs)."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return f"one device: {next(model.parameters()).device}"
    counts: dict[str, int] = {}
    for dev in device_map.values():
        counts[str(dev)] = counts.get(str(dev), 0) + 1
    return "device map: " + ", ".join(f"{d}: {n} modules" for d, n in counts.items())


def input_device(model: nn.Module) -> torch.device:
    """Where token ids go: the embedding's execution device (its weights' device, or for an offloaded
    embedding the device its hook runs it on)."""
    embed = model.get_input_embeddings()
    hook = getattr(embed, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    return embed.weight.device
