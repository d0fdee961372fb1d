"""Block-to-block (B2B) distillation of SPD blocks, after head grouping for the extremely sensitive ones.

For each SB or ESB block i of a plan, with x_i = h_i the block's input in the ORIGINAL model for the
calibration rows as ranking scores them (spd.perplexity.calibration_inputs: the prefix token, then the
window's first L - 1 tokens), and
y_i = h_{i+1} = block_i(x_i) its original output (spd.activations, captured once before any change):

    min over theta_i   E_n || SPD_R(block_i; theta_i)(x_n) - y_n ||^2 / (L D)       (MSE per element)

theta_i = block i's parameters only, initialised from the original weights (after head grouping, which
leaves y unchanged); AdamW (weight decay 0 by default: the target is the teacher, not smaller weights,
and RMSNorm gains should not decay), lr 5e-5, 10 epochs over the calibration windows in seeded random
order, in fp32. Every block trains against original-model inputs, so blocks are independent and order
does not matter. Resumable: each finished block's weights go to out_dir/block_{i}.safetensors, then its
entry to out_dir/manifest.json, both atomically; a restart loads finished blocks instead of training them,
and a block whose manifest entry is missing is trained again from the original weights.

Settings come from one typed config, spd.config.DistillConfig (`distill.*`), for spd-distill and the study
alike. The plan returned names each distilled block's file and sha256 (plan.weights), so every later stage
puts exactly these weights on the model through spd.surgery.apply_plan_.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from spd.activations import capture_hidden_states, state_bytes
from spd.block import SPDDecoderLayer, decoder_layers, remove_spd_
from spd.config import DistillConfig
from spd.cost import block_flops_per_token, throughput
from spd.errors import PlanError, SPDError
from spd.heads import group_heads_
from spd.perplexity import calibration_inputs, prefix_token
from spd.placement import writable
from spd.plan import SPDPlan
from spd.run import read_json, write_bytes_atomic, write_json_atomic
from spd.surgery import apply_plan_, mark_carried_

SCHEMA = "spd.distill/1"
STATE_SCHEMA = "spd.distill-state/2"


@torch.no_grad()
def block_mse(block, X: torch.Tensor, Y: torch.Tensor, kwargs: dict, batch_size: int) -> float:
    """Mean squared error of block(X) against Y over all windows (N, L, D)."""
    p = next(block.parameters())
    total = 0.0
    for s in range(0, len(X), batch_size):
        out = block(X[s:s + batch_size].to(p.device, p.dtype), **kwargs)
        total += F.mse_loss(out.float(), Y[s:s + batch_size].to(p.device).float(), reduction="sum").item()
    return total / Y.numel()


def train_block(block, X: torch.Tensor, Y: torch.Tensor, kwargs: dict, epochs: int, lr: float,
                batch_size: int, weight_decay: float, seed: int, desc: str = "", progress: bool = True) -> list[float]:
    """AdamW on block's parameters, MSE(block(X), Y) over windows (N, L, D); returns the mean loss per epoch."""
    params = [p for p in block.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    dev, dtype = params[0].device, params[0].dtype
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(len(X), generator=g)
        total, steps = 0.0, 0
        bar = tqdm(range(0, len(X), batch_size), desc=f"{desc} epoch {epoch + 1}/{epochs}", disable=not progress,
                   leave=False)
        for s in bar:
            idx = order[s:s + batch_size]
            loss = F.mse_loss(block(X[idx].to(dev, dtype), **kwargs).float(), Y[idx].to(dev).float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
            bar.set_postfix(loss=f"{total / steps:.3e}")
        losses.append(total / steps)
        if progress:
            tqdm.write(f"{desc} epoch {epoch + 1}/{epochs}: mean train loss {losses[-1]:.4e}")
    opt.zero_grad(set_to_none=True)
    return losses


def _fingerprint(plan: SPDPlan, tokens: torch.Tensor, dtype: torch.dtype, opts: dict) -> dict:
    """What a finished block depends on: a restart with other settings must not reuse it."""
    return {
        "tp": plan.tp, "dtype": str(dtype),
        "calib_sha256": hashlib.sha256(tokens.cpu().numpy().tobytes()).hexdigest(),
        "calib_shape": list(tokens.shape), "inputs": "calibration_inputs (prefix token + first L-1 tokens)",
        **{k: opts[k] for k in sorted(opts) if k != "spill_gb"},
    }


def distill_blocks_(model, plan: SPDPlan, tokens: torch.Tensor, out_dir: str | Path, cfg: DistillConfig,
                    *, head_grouping: bool = True, dtype: torch.dtype = torch.float32,
                    spill_dir: str | Path | None = None, progress: bool = True,
                    activations=None) -> tuple[SPDPlan, dict]:
    """HG on ESB blocks (when head_grouping), then B2B on SB and ESB blocks of plan; the model ends with
    the returned plan applied.

    model: the ORIGINAL LlamaForCausalLM (no head permutation; SPD blocks, if any, are removed first).
    tokens: (N, L) calibration windows. cfg: the distillation settings (epochs, lr, batch size...).
    Returns (plan with head_perm of the grouped blocks and the weights of every distilled block, report).
    Activations are spilled to spill_dir (default out_dir/activations) when they exceed cfg.spill_gb;
    `activations`, a callable returning an ActivationStore that holds every needed h_i of the original
    model (a persistent capture shared by a sweep), replaces the capture; it is called only when some
    block still needs training.
    """
    if plan.head_perm or plan.weights:
        raise PlanError(f"the plan already has head permutations or distilled weights (blocks "
                        f"{sorted(set(plan.head_perm) | set(plan.weights))}); distill starts from the original "
                        "model and a plan without them (spd-rank's plan.json)")
    opts = {**asdict(cfg), "head_grouping": head_grouping}
    spill_gb = cfg.spill_gb
    out_dir = Path(out_dir)
    remove_spd_(model)
    apply_plan_(model, plan)  # validates the plan against the model before anything is computed
    remove_spd_(model)
    layers = decoder_layers(model)
    todo = plan.blocks_in("SB", "ESB")
    fp = _fingerprint(plan, tokens, dtype, opts)
    state = read_json(out_dir / "manifest.json") or {"schema": STATE_SCHEMA, "settings": fp, "blocks": {}}
    if state.get("settings") != fp:
        raise SPDError(f"{out_dir} holds distilled blocks made with other settings or calibration data "
                       f"({state.get('settings')}); use a new output directory or delete {out_dir}")
    # A block's result depends on the settings and on whether head grouping ran on it, not on the other
    # blocks (all train on original-model inputs): any plan may reuse it, so sweeps share one directory.
    hg = {i: plan.tiers[i] == "ESB" and head_grouping for i in todo}
    done = {int(i): e for i, e in state["blocks"].items()
            if (out_dir / e["file"]).is_file() and int(i) in hg and e.get("hg") == hg[int(i)] and "sha256" in e}
    need = [i for i in todo if i not in done]

    store = activations() if need and activations is not None else None
    if need and store is None:  # the teacher: original-model hidden states, before any block is changed or loaded
        model_dtype = next(model.parameters()).dtype
        spill = state_bytes(*tokens.shape, model.config.hidden_size, need, model_dtype) > spill_gb * 2**30
        inputs = calibration_inputs(tokens, prefix_token(config=model.config))  # as ranking scores them
        store = capture_hidden_states(model, inputs, need, cfg.batch_size,
                                      (spill_dir or out_dir / "activations") if spill else None, progress)
    report: dict[int, dict] = {}
    try:
        for i in tqdm(todo, desc="distill blocks", disable=not progress):
            if i in done:  # finished by an earlier run: load, do not retrain
                with writable(layers[i]):
                    layers[i].load_state_dict(load_file(str(out_dir / done[i]["file"])))
                report[i] = {**done[i], "resumed": True}
                continue
            with writable(layers[i]):  # an offloaded block trains on its execution device, then goes back
                report[i] = _distill_one(layers[i], i, plan, store, out_dir, dtype, opts, progress, model.config)
            state["blocks"][str(i)] = {k: v for k, v in report[i].items() if k != "resumed"}
            write_json_atomic(out_dir / "manifest.json", state)  # written after the weights: the done-marker
            store.release(i)
    finally:
        if store is not None:
            store.cleanup()
    perms = {i: r["head_perm"] for i, r in report.items() if r.get("head_perm") is not None}
    weights = {i: {"file": str(out_dir / r["file"]), "sha256": r["sha256"]} for i, r in report.items()}
    new_plan = replace(plan, head_perm=perms, weights=weights,
                       source={**plan.source, "distill": {k: fp[k] for k in opts if k in fp}})
    mark_carried_(model, new_plan)  # the blocks in memory are exactly the files just written or loaded
    apply_plan_(model, new_plan)
    return new_plan, {"schema": SCHEMA, "settings": fp, "blocks": {str(i): report[i] for i in sorted(report)}}


def _distill_one(layer, i: int, plan: SPDPlan, store, out_dir: Path, dtype, opts: dict, progress: bool,
                 layer_config=None) -> dict:
    """HG (ESB) + B2B of one block in place; writes its weights atomically; returns its report entry."""
    t0 = time.perf_counter()
    model_dtype = next(layer.parameters()).dtype
    layer.to(dtype)  # train in fp32 by default; Parameter objects are kept, only their data is cast
    X, Y = store.get(i), store.get(i + 1)  # (N, L, D) each
    kwargs = store.block_kwargs(next(layer.parameters()).device, dtype)
    bs = opts["batch_size"]
    entry = {"tier": plan.tiers[i], "head_perm": None}
    if plan.tiers[i] == "ESB" and opts["head_grouping"]:
        spd = SPDDecoderLayer(layer, plan.tp, plan.tiers[i])
        entry["loss_before_hg"] = block_mse(spd, X, Y, kwargs, bs)
        spd.restore()
        perm, hg = group_heads_(layer, X, kwargs["position_embeddings"], plan.tp, bs, opts["max_rows"],
                                seed=opts["seed"])
        entry["head_perm"], entry["head_grouping"] = perm, hg
    student = SPDDecoderLayer(layer, plan.tp, plan.tiers[i])  # same Parameters as the model's block
    try:
        entry["loss_before"] = block_mse(student, X, Y, kwargs, bs)
        entry["epoch_losses"] = train_block(student, X, Y, kwargs, opts["epochs"], opts["lr"], bs,
                                            opts["weight_decay"], opts["seed"] + i, f"block {i}", progress)
        entry["loss_after"] = block_mse(student, X, Y, kwargs, bs)
    finally:
        student.restore()
        layer.to(model_dtype)
    entry["target_mean_square"] = float(Y.float().pow(2).mean())  # the scale the MSE is relative to
    seconds = time.perf_counter() - t0
    entry["minutes"] = seconds / 60
    trained = opts["epochs"] * X.shape[0] * X.shape[1]  # tokens through forward + backward (3x a forward)
    entry["cost"] = throughput(trained, 3 * trained * block_flops_per_token(layer_config, X.shape[1]), seconds)
    entry["hg"] = entry["head_perm"] is not None or (plan.tiers[i] == "ESB" and opts["head_grouping"])
    entry["file"] = f"block_{i}{'_hg' if entry['hg'] else ''}.safetensors"
    data = save({k: v.detach().cpu().contiguous() for k, v in layer.state_dict().items()})
    entry["sha256"] = hashlib.sha256(data).hexdigest()
    write_bytes_atomic(out_dir / entry["file"], data)
    return entry


def distill_main(cfg) -> dict:
    """spd-distill: HG on ESB blocks, then B2B on SB + ESB blocks of cfg.spd.plan, with cfg.distill's settings.

    cfg: spd.config.RunApp. Writes run_dir/distill/ (one file per block, resumable), run_dir/plan.json (the
    plan with head_perm and the distilled blocks' weights: what spd-ppl, spd-eval and spd-export take),
    distill.json and the export run_dir/model. Runs on the model's device (model.device).
    """
    from spd.calibration import calibration_tokens
    from spd.export import export_
    from spd.load import load_model
    from spd.perplexity import windows_perplexity
    from spd.run import meta, start_run, to_plain

    if not cfg.spd.plan:
        raise PlanError("spd-distill needs spd.plan=PATH/plan.json (written by spd-rank)")
    run_dir = start_run(cfg.run_dir, cfg, stage="distill", tp=cfg.parallel.tp)
    plan = SPDPlan.load(cfg.spd.plan)
    if plan.tp != cfg.parallel.tp:
        raise PlanError(f"the plan is for tp={plan.tp} but parallel.tp={cfg.parallel.tp}; set parallel.tp={plan.tp}")
    model, tokenizer = load_model(cfg.model)
    tokens = calibration_tokens(tokenizer, cfg.calib)
    ppl = {"calibration_original": windows_perplexity(model, tokens, cfg.calib.batch_size)}
    apply_plan_(model, plan)
    ppl["calibration_zero_shot"] = windows_perplexity(model, tokens, cfg.calib.batch_size)
    remove_spd_(model)
    t0 = time.perf_counter()
    plan, report = distill_blocks_(model, plan, tokens, run_dir / "distill", cfg.distill)
    minutes = (time.perf_counter() - t0) / 60
    ppl["calibration_distilled"] = windows_perplexity(model, tokens, cfg.calib.batch_size)
    plan.save(run_dir / "plan.json")
    provenance = {"source_model": to_plain(cfg.model), "plan_file": str(cfg.spd.plan), "ranking": plan.source,
                  "calib": to_plain(cfg.calib), "distill": to_plain(cfg.distill)}
    export_(model, tokenizer, plan, run_dir / "model", provenance=provenance, perplexity=ppl)
    out = {**report, "perplexity": ppl, "minutes": minutes, "export": str(run_dir / "model"),
           "meta": meta(stage="distill", tp=plan.tp)}
    write_json_atomic(run_dir / "distill.json", out)
    print(f"distilled {len(report['blocks'])} blocks in {minutes:.2f} min; calibration ppl "
          + ", ".join(f"{k.removeprefix('calibration_')} {v:.3f}" for k, v in ppl.items())
          + f" -> {run_dir / 'plan.json'}")
    return out
