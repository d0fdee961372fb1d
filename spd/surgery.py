"""Model surgery from outside: apply an SPD plan to a loaded LlamaForCausalLM, in place."""

from __future__ import annotations

from torch import nn

from spd.block import decoder_layers, remove_spd_, set_spd_, spd_blocks
from spd.errors import PlanError
from spd.layout import layout_for
from spd.plan import SPDPlan

__all__ = ["apply_spd_", "remove_spd_", "spd_blocks"]


def apply_spd_(model: nn.Module, plan: SPDPlan) -> nn.Module:
    """Make exactly plan.blocks SPD blocks at degree plan.tp (emulated on one device); returns model.

    Validates the plan against the model (block count, heads divisible by R, GQA) first, so a bad plan
    fails before anything changes. The plan is recorded on model.config.spd_plan for export.
    """
    n = len(decoder_layers(model))
    if plan.num_layers != n:
        raise PlanError(f"the plan is for {plan.num_layers} blocks but the model has {n}; rank this model again")
    layout_for(model.config, plan.tp)  # raises ParallelConfigError listing the valid degrees
    set_spd_(model, plan.tp, plan.tiers)
    model.config.spd_plan = plan.to_dict()
    return model
