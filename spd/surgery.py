"""Model surgery from outside: the one way to put an SPD plan on a loaded LlamaForCausalLM, in place.

A plan changes a model in two ways: its weights (head permutations and distilled blocks, plan.head_perm
and plan.weights) and its forward (the SPD blocks of plan.tiers at degree R). apply_plan_ does both. The
weights a model already carries are recorded on its config as `spd_weights` (head_perm and the sha256 of
each distilled block), so a model loaded from an spd-export, or one that distillation left in memory, is
recognised: its weights are used as they are when they are the plan's, and anything else is refused
rather than permuted twice or mixed with another plan's blocks; a plan whose distilled blocks replace the
whole state of every block the carried weights changed (logit distillation's after B2B) is put on. A plan
without head permutations or distilled blocks changes only the forward: it runs on whatever weights the
model holds (a dense plan on an export evaluates the export's weights without SPD).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load
from torch import nn

from spd.block import decoder_layers, remove_spd_, set_spd_, spd_blocks
from spd.errors import PlanError
from spd.layout import layout_for
from spd.placement import writable
from spd.plan import SPDPlan

__all__ = ["apply_plan_", "carried_weights", "mark_carried_", "remove_spd_", "spd_blocks"]


def _weights_of(plan_dict: dict) -> dict:
    return {"head_perm": {str(i): list(p) for i, p in plan_dict.get("head_perm", {}).items()},
            "weights": {str(i): (w["sha256"] if isinstance(w, dict) else w)
                        for i, w in plan_dict.get("weights", {}).items()}}


def carried_weights(model: nn.Module) -> dict:
    """{"head_perm": {block: perm}, "weights": {block: sha256}} that the model's weights already hold.

    Read from config.spd_weights (set by apply_plan_ and by distillation, kept by spd-export), else from an
    older export's config.spd_plan; empty for an original checkpoint.
    """
    config = model.config
    if getattr(config, "spd_weights", None):
        return _weights_of(config.spd_weights)
    if getattr(config, "spd_plan", None):
        return _weights_of(config.spd_plan)
    return {"head_perm": {}, "weights": {}}


def mark_carried_(model: nn.Module, plan: SPDPlan) -> None:
    """Record that the model's weights now hold plan's head permutations and distilled blocks."""
    model.config.spd_weights = {k: plan.identity()[k] for k in ("head_perm", "weights")}


def read_block(ref: dict) -> dict[str, torch.Tensor]:
    """A distilled block's state dict from plan.weights[i], its sha256 checked."""
    path = Path(ref["file"])
    if not path.is_file():
        raise PlanError(f"distilled block weights {path} do not exist; re-run the distillation that wrote them "
                        "(spd-distill or spd-study), or use the plan file that sits beside them")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != ref["sha256"]:
        raise PlanError(f"{path} has sha256 {digest}, but the plan expects {ref['sha256']}: the file was "
                        "changed after the plan was written; re-run the distillation")
    return load(data)


@torch.no_grad()
def apply_plan_(model: nn.Module, plan: SPDPlan, emulate: bool = True) -> nn.Module:
    """Put `plan` on the model in place; returns model.

    Weights: head permutations (plan.head_perm) and distilled blocks (plan.weights) are applied, unless the
    model already carries exactly these; weights of another plan are refused. A plan with neither keeps the
    model's weights as they are. Forward: with emulate, exactly plan.blocks become SPD blocks at
    degree plan.tp (emulated on one device); without, every block is left dense for a tensor-parallel
    runtime to shard with the plan. The plan is validated against the model first (block count, heads
    divisible by R), so a bad plan fails before anything changes; it is recorded on config.spd_plan.
    """
    from spd.heads import permute_heads_

    layers = decoder_layers(model)
    if plan.num_layers != len(layers):
        raise PlanError(f"the plan is for {plan.num_layers} blocks but the model has {len(layers)}; "
                        "rank this model again")
    layout_for(model.config, plan.tp)  # raises ParallelConfigError listing the valid degrees
    want = {k: plan.identity()[k] for k in ("head_perm", "weights")}
    have = carried_weights(model)
    changes = bool(plan.head_perm or plan.weights)
    if have != want and changes:
        carried = {int(i) for i in (*have["head_perm"], *have["weights"])}
        if carried - set(plan.weights):  # a block whose whole state the plan replaces cannot be mixed up
            raise PlanError(
                f"the model's weights already carry head permutations for blocks {sorted(map(int, have['head_perm']))} "
                f"and distilled blocks {sorted(map(int, have['weights']))} of another plan; this plan needs "
                f"{sorted(plan.head_perm)} and {sorted(plan.weights)}: load the original checkpoint to apply it")
        blocks = {i: read_block(ref) for i, ref in plan.weights.items()}  # all checked before any change
        remove_spd_(model)
        for i, perm in sorted(plan.head_perm.items()):
            if i not in blocks:  # a distilled block's file holds its heads already permuted
                with writable(layers[i]):
                    permute_heads_(layers[i], perm)
        for i, state in sorted(blocks.items()):
            with writable(layers[i]):
                layers[i].load_state_dict(state)
        mark_carried_(model, plan)
    if emulate:
        set_spd_(model, plan.tp, plan.tiers)
    else:
        remove_spd_(model)
    model.config.spd_plan = plan.to_dict()
    return model

