"""Checkpoints into the tensor-parallel runtime: an spd-export directory or any ModelConfig, sharded per rank.

Every rank loads the whole checkpoint on the CPU as a transformers LlamaForCausalLM, copies it into a
Transformer (from_hf), keeps only its own slices (shard_ with the plan's SPD blocks), and only then
moves its shard to ctx.device in the requested dtype: no GPU ever holds the whole model.

Head order and distilled blocks: the plan goes on the CPU model through spd.surgery.apply_plan_ (emulate=False),
the one path every entry point takes: an spd-export directory carries its plan's permuted, distilled weights
(used as they are; another plan is refused), any other checkpoint gets the plan's head permutations and
distilled blocks applied. So the sharded model computes exactly the single-device emulation
apply_plan_(model, plan) at R = plan.tp.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from overlap.context import TPContext
from overlap.model import Transformer
from overlap.tp import shard_
from spd.errors import ModelLoadError, PlanError
from spd.load import dtype_name, torch_dtype
from spd.plan import SPDPlan

def is_export(path: str | Path) -> bool:
    """Whether path is an spd-export directory (its config.json carries spd_plan)."""
    cfg = Path(path) / "config.json"
    return cfg.is_file() and "spd_plan" in json.loads(cfg.read_text())


def load_hf(source, dtype: torch.dtype | str = torch.float32, plan: SPDPlan | None = None):
    """(LlamaForCausalLM on the CPU with the heads in the plan's order, tokenizer or None, plan or None).

    source: an spd-export directory, a plain HF directory, or a spd.config.ModelConfig (any source
    spd.load.load_model knows; its device is overridden to the CPU, its dtype by dtype).
    """
    from spd.config import ModelConfig
    from spd.export import read_plan
    from spd.load import load_model
    from spd.surgery import apply_plan_

    dtype = torch_dtype(dtype)
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a model directory (no config.json); pass an spd-export or HF "
                                 f"directory, or a spd.config.ModelConfig")
        plan = plan or (read_plan(path) if is_export(path) else None)
        source = ModelConfig(name=path.name, source="hf", path=str(path))
    if not isinstance(source, ModelConfig):
        raise ModelLoadError(f"cannot load a model from a {type(source).__name__}; pass an spd-export or HF "
                             f"directory, or a spd.config.ModelConfig")
    hf, tokenizer = load_model(dataclasses.replace(source, device="cpu", dtype=dtype_name(dtype)))
    stored = getattr(hf.config, "spd_plan", None)
    plan = plan or (SPDPlan.from_dict(stored) if stored else None)
    if plan is not None:
        apply_plan_(hf, plan, emulate=False)
    return hf, tokenizer, plan


def load_runtime_model(source, ctx: TPContext, dtype: torch.dtype | str = torch.float32,
                       plan: SPDPlan | None = None) -> tuple[Transformer, object, SPDPlan | None]:
    """(ctx.rank's shard of the model on ctx.device in dtype, tokenizer or None, the plan applied).

    source: an spd-export directory (plan: its spd_plan unless one is given), a plain HF directory or a
    spd.config.ModelConfig (plan: the one given, or None for the dense model). The plan must be for
    R = ctx.world_size. Every rank calls this with the same arguments. The returned model's
    `source_config` is the transformers config it was read from (max_position_embeddings, name).
    """
    dtype = torch_dtype(dtype)
    hf, tokenizer, plan = load_hf(source, dtype, plan)
    if plan is not None and plan.tp != ctx.world_size:
        raise PlanError(f"the plan is for tp={plan.tp} but {ctx.world_size} ranks were launched; launch "
                        f"--nproc-per-node {plan.tp}, or make a plan for tp={ctx.world_size}")
    model = Transformer.from_hf(hf)  # (CPU) the whole model, in the checkpoint's stored head order
    config = hf.config
    del hf
    shard_(model, ctx, plan)  # slices are copies: the whole weights go with `model`'s old Parameters
    model.to(device=ctx.device, dtype=dtype)
    model.source_config = config
    return model.eval(), tokenizer, plan
