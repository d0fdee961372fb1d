"""Learning-rate schedules of the repair stages (B2B per block, logit distillation of the whole model).

With T optimizer steps, w = round(warmup x T) warm-up steps and base rate lr, step t (0-based) uses
lr x f(t): f(t) = (t + 1) / w during warm-up, then constant: 1, or cosine: (1 + cos(pi p)) / 2 with
p = (t - w) / (T - w) the progress after warm-up (so the rate falls from lr towards 0 at the last step).
"""

from __future__ import annotations

import math

import torch

from spd.errors import SPDError

SCHEDULES = ("constant", "cosine")


def check_schedule(schedule: str, warmup: float, where: str) -> None:
    """Refuse an unknown schedule or a warm-up share outside [0, 1) with the valid values."""
    if schedule not in SCHEDULES:
        raise SPDError(f"{where}.schedule={schedule!r}; valid: {', '.join(SCHEDULES)}")
    if not 0.0 <= warmup < 1.0:
        raise SPDError(f"{where}.warmup={warmup}: the share of warm-up steps must be in [0, 1)")


def lr_factor(step: int, total: int, schedule: str, warmup: float) -> float:
    """f(step) of the module docstring."""
    w = round(warmup * total)
    if step < w:
        return (step + 1) / w
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - w) / max(total - w, 1)))


def scheduler(opt: torch.optim.Optimizer, total: int, schedule: str, warmup: float):
    """A LambdaLR applying lr_factor; call .step() after each optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor(t, total, schedule, warmup))
