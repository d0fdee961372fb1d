"""Logit distillation (KD): a whole-model repair after B2B, beyond the paper.

B2B repairs each SPD block against its own teacher output; the errors it leaves compound through the
blocks after it. KD trains every SPD block's parameters at once against the dense model's next-token
distributions on the calibration windows (the rows ranking and B2B see: spd.perplexity.calibration_inputs):

    min over theta_SPD   E_{n, t}  T^2 KL( softmax(z_dense / T) || softmax(z_SPD(theta) / T) )

z = logits at position t of window n, T = kd.temperature; the dense teacher is the original model (no SPD,
original weights), run under no_grad beside the student. Only the SPD blocks' parameters train (every
other parameter is frozen, so the embeddings, the LM head and the dense blocks stay bit for bit); AdamW,
kd.lr with kd.schedule / kd.warmup (spd.schedule), kd.steps steps of kd.batch_size windows, in seeded
random order (a new permutation each pass over the windows). The result is carried by a plan: each SPD
block's state after KD is written to out_dir/block_{i}.safetensors with its sha256 (plan.weights), head
permutations unchanged (the files hold permuted heads), so spd.surgery.apply_plan_ puts it on any model.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save
from tqdm.auto import tqdm

from spd.block import decoder_layers
from spd.config import KDConfig
from spd.cost import model_flops_per_token, throughput
from spd.errors import SPDError
from spd.perplexity import calibration_inputs, prefix_token, windows_perplexity
from spd.plan import SPDPlan
from spd.run import write_bytes_atomic
from spd.schedule import check_schedule, scheduler
from spd.surgery import apply_plan_, mark_carried_

SCHEMA = "spd.kd/1"


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(softmax(teacher / T) || softmax(student / T)), mean over positions; logits (..., V)."""
    t = temperature
    s_logp = (student.float() / t).log_softmax(-1).flatten(0, -2)
    t_logp = (teacher.float() / t).log_softmax(-1).flatten(0, -2)
    return F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean") * t * t


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


@torch.no_grad()
def calibration_kl(model, teacher, inputs: torch.Tensor, batch_size: int, temperature: float = 1.0) -> float:
    """Mean per-position KL(dense || SPD) over calibration input rows (N, L)."""
    dev = next(model.parameters()).device
    total = 0.0
    for s in range(0, len(inputs), batch_size):
        ids = inputs[s:s + batch_size].to(dev)
        total += kd_loss(_logits(model, ids), _logits(teacher, ids), temperature).item() * ids.numel()
    return total / inputs.numel()


def check_kd(cfg: KDConfig) -> None:
    """Refuse settings KD cannot run, naming what is valid."""
    check_schedule(cfg.schedule, cfg.warmup, "kd")
    if cfg.steps < 0 or cfg.batch_size < 1 or cfg.temperature <= 0:
        raise SPDError(f"kd.steps={cfg.steps}, kd.batch_size={cfg.batch_size}, kd.temperature={cfg.temperature}: "
                       "need steps >= 0, batch_size >= 1 and temperature > 0")


def _batches(n: int, batch_size: int, steps: int, seed: int):
    """Window indices of each step: seeded permutations of range(n), one after another."""
    g = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=g)])
        yield order[:batch_size]
        order = order[batch_size:]


def train_kd_(model, teacher, plan: SPDPlan, inputs: torch.Tensor, cfg: KDConfig, progress: bool = True) -> list[float]:
    """KD of the SPD blocks of `model` (plan applied) in place; returns the loss per step."""
    layers = decoder_layers(model)
    grads = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for i in plan.blocks for p in layers[i].parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = scheduler(opt, cfg.steps, cfg.schedule, cfg.warmup)
    dev, losses = params[0].device, []
    try:
        bar = tqdm(_batches(len(inputs), cfg.batch_size, cfg.steps, cfg.seed), total=cfg.steps, desc="kd",
                   disable=not progress, leave=False)
        for idx in bar:
            ids = inputs[idx].to(dev)
            with torch.no_grad():
                target = _logits(teacher, ids)
            loss = kd_loss(_logits(model, ids), target, cfg.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(kl=f"{losses[-1]:.4f}")
    finally:
        opt.zero_grad(set_to_none=True)
        for p, g in grads.items():
            p.requires_grad_(g)
    return losses


def kd_repair_(model, teacher, plan: SPDPlan, tokens: torch.Tensor, out_dir: str | Path, cfg: KDConfig,
               batch_size: int = 4, progress: bool = True) -> tuple[SPDPlan, dict]:
    """KD of plan's SPD blocks (module doc); the model ends with the returned plan applied.

    model: carries `plan` (B2B weights) or the original weights (they are put on it); teacher: the original
    dense model. tokens: (N, L) calibration windows. Writes out_dir/block_{i}.safetensors for every SPD
    block; returns (the plan naming them, a report with the calibration KL and perplexity before and after,
    the losses and the minutes)."""
    from spd.placement import is_offloaded

    check_kd(cfg)
    if is_offloaded(model) or is_offloaded(teacher):
        raise SPDError("logit distillation trains every SPD block at once next to a second (teacher) copy of the "
                       "model and cannot run with weights offloaded to the CPU or disk; give it GPUs for two "
                       "copies (model.device_map=auto, model.max_memory) or use study.strategy=b2b_hg")
    if not plan.blocks:
        raise SPDError("logit distillation needs SPD blocks: the plan has none")
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    apply_plan_(model, plan)
    inputs = calibration_inputs(tokens, prefix_token(config=model.config))
    report = {"schema": SCHEMA, "settings": asdict(cfg), "blocks": plan.blocks,
              "kl_before": calibration_kl(model, teacher, inputs, batch_size, cfg.temperature),
              "calibration_ppl_before": windows_perplexity(model, tokens, batch_size)}
    report["losses"] = train_kd_(model, teacher, plan, inputs, cfg, progress)
    report["kl_after"] = calibration_kl(model, teacher, inputs, batch_size, cfg.temperature)
    report["calibration_ppl_after"] = windows_perplexity(model, tokens, batch_size)
    layers, weights = decoder_layers(model), {}
    for i in plan.blocks:
        data = save({k: v.detach().cpu().contiguous() for k, v in layers[i].state_dict().items()})
        weights[i] = {"file": str(out_dir / f"block_{i}.safetensors"), "sha256": hashlib.sha256(data).hexdigest()}
        write_bytes_atomic(weights[i]["file"], data)
    new_plan = replace(plan, weights=weights, source={**plan.source, "kd": asdict(cfg)})
    mark_carried_(model, new_plan)  # the blocks in memory are exactly the files just written
    apply_plan_(model, new_plan)
    report["minutes"] = (time.perf_counter() - t0) / 60
    tokens_trained = cfg.steps * cfg.batch_size * tokens.shape[1]
    report["tokens_per_s"] = tokens_trained / (report["minutes"] * 60) if report["minutes"] else None
    per_token = model_flops_per_token(model.config, tokens.shape[1])  # student forward + backward, teacher forward
    report["cost"] = throughput(tokens_trained, 4 * per_token * tokens_trained, report["minutes"] * 60)
    if progress:
        print(f"kd: {cfg.steps} steps in {report['minutes']:.2f} min; calibration KL {report['kl_before']:.4f} -> "
              f"{report['kl_after']:.4f}, ppl {report['calibration_ppl_before']:.3f} -> "
              f"{report['calibration_ppl_after']:.3f}")
    if not math.isfinite(report["kl_after"]):
        raise SPDError(f"logit distillation diverged (calibration KL {report['kl_after']}); lower kd.lr={cfg.lr}")
    return new_plan, report
