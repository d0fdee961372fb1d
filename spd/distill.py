"""Block-to-block (B2B) distillation of SPD blocks, after head grouping for the extremely sensitive ones.

For each SB or ESB block i of a plan, with x_i the block's input for the calibration rows as ranking scores
them (spd.perplexity.calibration_inputs: the prefix token, then the window's first L - 1 tokens) and
y_i = h_{i+1} the ORIGINAL model's output of block i on the original input (spd.activations, captured once
before any change):

    min over theta_i   E_n || SPD_R(block_i; theta_i)(x_n) - y_n ||^2 / (L D)       (MSE per element)

theta_i = block i's parameters only, initialised from the original weights (after head grouping, which
leaves the full block's output unchanged); AdamW (weight decay 0 by default: the target is the teacher,
not smaller weights, and RMSNorm gains should not decay), lr 5e-5, 10 epochs over the calibration windows
in seeded random order, in fp32, with a constant rate (`distill.schedule=cosine` and `distill.warmup`:
spd.schedule). Inputs x_i (`distill.inputs`):

- dense (the paper): x_i = h_i of the ORIGINAL model. Blocks are independent: order does not matter and
  a block's result does not depend on the plan, so sweeps share it.
- sequential: x_i = the hidden state entering block i in the partly converted model, whose blocks before
  i are already in their plan form (ISB zero-shot SPD, SB / ESB after their own repair), propagated block
  by block from h_0. The target stays the original model's h_{i+1}, so block i also learns to undo the
  error its predecessors left. A block's result then depends on the plan's tiers, which key it.

Head grouping that never hurts (ESB blocks, `head_grouping`): the candidates are the identity, the paper's
rule (spd.heads.group_heads_) and every other GQA-valid head-to-rank ordering when there are at most
`distill.hg_candidates` of them (SmolLM2-135M at R = 3: 3! = 6); with more, the identity, the paper's rule
and the hg_candidates - 2 orderings with the lowest zero-shot SPD error among 4 x hg_candidates seeded
random ones. `distill.hg_search=full` (the default) B2B-trains every candidate with the same seed;
`proxy`, for models where a block's B2B is expensive, ranks the non-identity candidates by their zero-shot
SPD error (after the permutation, before B2B) and trains only the best of them and the identity (on
SmolLM2-135M at R = 3 the zero-shot best was the final best in 4 of 4 blocks; on a toy fixture it was not:
docs/distill.md). Of the trained ones,
the lowest error after training is kept (the identity on ties), so with either search a block's final
calibration error with HG is never above its error without HG (the identity candidate is exactly B2B alone;
with dense inputs, when the folder already holds the block's B2B-alone entry, the search loads it instead of
training the identity again). The report records every candidate's
error before and after training, and for the chosen and the identity grouping the error before HG, after
HG (before B2B) and after B2B.

Resumable: each finished block's weights go to out_dir/block_{i}.safetensors (block_{i}_hg with HG), then its
entry to out_dir/manifest.json (key entry_key(i, hg)), both atomically; a restart loads finished blocks instead of training them, and a
block whose manifest entry is missing is trained again from the original weights.

Settings come from one typed config, spd.config.DistillConfig (`distill.*`), for spd-distill and the study
alike. The plan returned names each distilled block's file and sha256 (plan.weights), so every later stage
puts exactly these weights on the model through spd.surgery.apply_plan_.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from spd.activations import capture_hidden_states, state_bytes
from spd.block import SPDDecoderLayer, decoder_layers, remove_spd_
from spd.config import DistillConfig
from spd.cost import block_flops_per_token, throughput
from spd.errors import PlanError, SPDError
from spd.heads import attn_shape, canonical, group_heads_, num_orderings, orderings, permute_heads_, random_ordering
from spd.perplexity import calibration_inputs, prefix_token
from spd.placement import writable
from spd.plan import SPDPlan
from spd.run import read_json, write_bytes_atomic, write_json_atomic
from spd.schedule import check_schedule, scheduler
from spd.surgery import apply_plan_, mark_carried_

SCHEMA = "spd.distill/2"
STATE_SCHEMA = "spd.distill-state/3"
INPUTS = ("dense", "sequential")


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
                batch_size: int, weight_decay: float, seed: int, desc: str = "", progress: bool = True,
                schedule: str = "constant", warmup: float = 0.0) -> list[float]:
    """AdamW on block's parameters, MSE(block(X), Y) over windows (N, L, D); returns the mean loss per epoch."""
    params = [p for p in block.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(X) / batch_size)
    sched = scheduler(opt, epochs * steps_per_epoch, schedule, warmup)
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
            sched.step()
            total, steps = total + loss.item(), steps + 1
            bar.set_postfix(loss=f"{total / steps:.3e}")
        losses.append(total / steps)
        if progress:
            tqdm.write(f"{desc} epoch {epoch + 1}/{epochs}: mean train loss {losses[-1]:.4e}")
    opt.zero_grad(set_to_none=True)
    return losses


HG_SEARCH = ("proxy", "full")


def check_distill(cfg: DistillConfig) -> None:
    """Refuse settings distillation cannot run, naming the valid values."""
    if cfg.inputs not in INPUTS:
        raise SPDError(f"distill.inputs={cfg.inputs!r}; valid: {', '.join(INPUTS)}")
    check_schedule(cfg.schedule, cfg.warmup, "distill")
    if cfg.hg_search not in HG_SEARCH:
        raise SPDError(f"distill.hg_search={cfg.hg_search!r}; valid: {', '.join(HG_SEARCH)}")
    if cfg.hg_candidates < 2:
        raise SPDError(f"distill.hg_candidates={cfg.hg_candidates}: at least 2 (the identity and the paper's rule)")


def _fingerprint(plan: SPDPlan, tokens: torch.Tensor, dtype: torch.dtype, opts: dict) -> dict:
    """What a finished block depends on: a restart with other settings must not reuse it."""
    fp = {
        "tp": plan.tp, "dtype": str(dtype),
        "calib_sha256": hashlib.sha256(tokens.cpu().numpy().tobytes()).hexdigest(),
        "calib_shape": list(tokens.shape), "rows": "calibration_inputs (prefix token + first L-1 tokens)",
        **{k: opts[k] for k in sorted(opts) if k not in ("spill_gb", "head_grouping")},
    }  # head grouping: per entry ("hg"), so a folder holds a block in both forms
    if opts["inputs"] == "sequential":  # a block's inputs depend on every block before it
        fp["tiers"] = {str(i): t for i, t in sorted(plan.tiers.items())}
    return fp


def _teacher_store(model, tokens, blocks, cfg: DistillConfig, out_dir: Path, spill_dir, progress: bool):
    """The original model's hidden states around `blocks`, spilled to disk above cfg.spill_gb."""
    model_dtype = next(model.parameters()).dtype
    spill = state_bytes(*tokens.shape, model.config.hidden_size, blocks, model_dtype) > cfg.spill_gb * 2**30
    inputs = calibration_inputs(tokens, prefix_token(config=model.config))  # as ranking scores them
    return capture_hidden_states(model, inputs, blocks, cfg.batch_size,
                                 (spill_dir or out_dir / "activations") if spill else None, progress)


@torch.no_grad()
def _advance(layer, H: torch.Tensor, plan: SPDPlan, i: int, store, batch_size: int) -> torch.Tensor:
    """Block i in its plan form (SPD at its tier, else dense) applied to hidden states H (N, L, D)."""
    p = next(layer.parameters())
    kwargs = store.block_kwargs(p.device, p.dtype)
    block = SPDDecoderLayer(layer, plan.tp, plan.tiers[i]) if i in plan.tiers else layer
    try:
        return torch.cat([block(H[s:s + batch_size].to(p.device, p.dtype), **kwargs).to(H.device, H.dtype)
                          for s in range(0, len(H), batch_size)])
    finally:
        if block is not layer:
            block.restore()


def entry_key(block: int, hg: bool) -> str:
    """A distilled block's key in manifest.json: "3" (B2B alone) or "3_hg" (head grouping, then B2B)."""
    return f"{block}_hg" if hg else str(block)


def _kept(state: dict, out_dir: Path, block: int, hg: bool) -> dict | None:
    """The manifest's finished entry of a block in one form (with or without HG), if its weights are there."""
    e = state["blocks"].get(entry_key(block, hg))
    return e if e and e.get("hg") == hg and "sha256" in e and (out_dir / e["file"]).is_file() else None


def distill_blocks_(model, plan: SPDPlan, tokens: torch.Tensor, out_dir: str | Path, cfg: DistillConfig,
                    *, head_grouping: bool = True, dtype: torch.dtype = torch.float32,
                    spill_dir: str | Path | None = None, progress: bool = True,
                    activations=None) -> tuple[SPDPlan, dict]:
    """HG on ESB blocks (when head_grouping), then B2B on SB and ESB blocks of plan; the model ends with
    the returned plan applied.

    model: the ORIGINAL LlamaForCausalLM (no head permutation; SPD blocks, if any, are removed first).
    tokens: (N, L) calibration windows. cfg: the distillation settings (epochs, lr, batch size, inputs...).
    Returns (plan with head_perm of the grouped blocks and the weights of every distilled block, report).
    Activations are spilled to spill_dir (default out_dir/activations) when they exceed cfg.spill_gb;
    `activations`, a callable returning an ActivationStore that holds every needed h_i of the original
    model (a persistent capture shared by a sweep), replaces the capture; it is called only when some
    block still needs training. With cfg.inputs=sequential the propagated states stay in memory.
    """
    check_distill(cfg)
    if plan.head_perm or plan.weights:
        raise PlanError(f"the plan already has head permutations or distilled weights (blocks "
                        f"{sorted(set(plan.head_perm) | set(plan.weights))}); distill starts from the original "
                        "model and a plan without them (spd-rank's plan.json)")
    opts = {**asdict(cfg), "head_grouping": head_grouping}
    sequential = cfg.inputs == "sequential"
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
    # dense inputs: a block's result depends on the settings and on whether head grouping ran on it, not on
    # the other blocks (all train on original-model inputs): any plan may reuse it, so sweeps share one
    # directory, which holds each block with and without HG side by side (entries "i" and "i_hg", files
    # block_i.safetensors and block_i_hg.safetensors). sequential: the settings name the plan's tiers.
    state["blocks"] = {entry_key(int(k.split("_")[0]), e["hg"]) if "hg" in e else k: e
                       for k, e in state["blocks"].items()}  # older manifests keyed every entry by its block alone
    hg = {i: plan.tiers[i] == "ESB" and head_grouping for i in todo}
    done = {i: e for i, h in hg.items() if (e := _kept(state, out_dir, i, h))}
    need = [i for i in todo if i not in done]
    blocks = sorted(set(need) | ({0} if sequential else set()))

    store = activations() if need and activations is not None else None
    if need and store is None:  # the teacher: original-model hidden states, before any block is changed or loaded
        store = _teacher_store(model, tokens, blocks, cfg, out_dir, spill_dir, progress)
    H = store.get(0) if need and sequential else None  # the partly converted model's h_j, j = 0, 1, ...
    report: dict[int, dict] = {}
    try:
        for j in tqdm(range(max(todo, default=-1) + 1), desc="distill blocks", disable=not progress):
            if j in done:  # finished by an earlier run: load, do not retrain
                with writable(layers[j]):
                    layers[j].load_state_dict(load_file(str(out_dir / done[j]["file"])))
                report[j] = {**done[j], "resumed": True}
            elif j in todo:
                X = H if sequential else store.get(j)
                with writable(layers[j]):  # an offloaded block trains on its execution device, then goes back
                    # B2B alone of this block, if kept: the same training as the HG search's identity candidate
                    # with dense inputs (sequential ones depend on the earlier blocks' forms, HG included)
                    plain = _kept(state, out_dir, j, False) if hg[j] and not sequential else None
                    report[j] = _distill_one(layers[j], j, plan, X, store.get(j + 1), store, out_dir, dtype, opts,
                                             progress, model.config, identity=plain)
                state["blocks"][entry_key(j, hg[j])] = {k: v for k, v in report[j].items() if k != "resumed"}
                write_json_atomic(out_dir / "manifest.json", state)  # written after the weights: the done-marker
                store.release(j)
            if H is not None and any(i > j for i in need):
                with writable(layers[j]):
                    H = _advance(layers[j], H, plan, j, store, cfg.batch_size)
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


def hg_candidates(layer, X: torch.Tensor, Y: torch.Tensor, kwargs: dict, tp: int, opts: dict,
                  batch_size: int) -> tuple[list[tuple[str, list[int]]], dict]:
    """(candidate (source, perm) list, the paper rule's report): identity first, then the paper's rule, then
    every other ordering, or the best zero-shot ones of a seeded random sample when there are too many."""
    H, KV, _ = attn_shape(layer.self_attn)
    original = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    paper, report = group_heads_(layer, X, kwargs["position_embeddings"], tp, batch_size, opts["max_rows"],
                                 seed=opts["seed"])
    layer.load_state_dict(original)
    out = [("identity", list(range(H))), ("paper", paper)]
    seen = {canonical(p, tp) for _, p in out}
    total = num_orderings(H, KV, tp)
    report |= {"orderings": total, "search": "exhaustive" if total <= opts["hg_candidates"] else "sampled"}
    if total <= opts["hg_candidates"]:
        pool = list(orderings(H, KV, tp))
    else:
        rng = np.random.default_rng(opts["seed"])
        pool = [random_ordering(H, KV, tp, rng) for _ in range(4 * opts["hg_candidates"])]
    fresh = {canonical(p, tp): p for p in pool if canonical(p, tp) not in seen}
    scored = []
    for key, perm in fresh.items():
        if report["search"] == "sampled":  # zero-shot error as a prefilter only
            scored.append((_zero_shot_error(layer, tp, "ESB", perm, X, Y, kwargs, batch_size), len(scored), perm))
            layer.load_state_dict(original)
        else:
            scored.append((0.0, len(scored), perm))
    keep = len(scored) if report["search"] == "exhaustive" else opts["hg_candidates"] - 2
    out += [("ordering", p) for _, _, p in sorted(scored)[:keep]]
    return out, report


def _train_candidate(layer, i: int, plan: SPDPlan, perm, X, Y, kwargs, opts: dict, progress: bool, desc: str) -> dict:
    """B2B of block i from its current weights with heads in `perm` order, in place: its losses."""
    if perm is not None:
        permute_heads_(layer, perm)
    student = SPDDecoderLayer(layer, plan.tp, plan.tiers[i])  # same Parameters as the model's block
    bs = opts["batch_size"]
    try:
        out = {"loss_before": block_mse(student, X, Y, kwargs, bs)}
        out["epoch_losses"] = train_block(student, X, Y, kwargs, opts["epochs"], opts["lr"], bs,
                                          opts["weight_decay"], opts["seed"] + i, desc, progress,
                                          schedule=opts["schedule"], warmup=opts["warmup"])
        out["loss_after"] = block_mse(student, X, Y, kwargs, bs)
    finally:
        student.restore()
    return out


def _zero_shot_error(layer, tp: int, tier: str, perm, X, Y, kwargs, batch_size: int) -> float:
    """The block's SPD error with its heads in `perm` order, before any training (the layer is left permuted)."""
    permute_heads_(layer, perm)
    spd = SPDDecoderLayer(layer, tp, tier)
    try:
        return block_mse(spd, X, Y, kwargs, batch_size)
    finally:
        spd.restore()


def _hg_search(layer, i: int, plan: SPDPlan, X, Y, kwargs, opts: dict, progress: bool,
               identity: tuple[dict, Path] | None = None) -> dict:
    """HG candidates B2B-trained from the original weights (all, or the identity and the zero-shot best:
    distill.hg_search); the layer ends with the best trained one (module doc). identity: the block's B2B-alone
    entry and weight file from the same folder (same settings and inputs, so the identity candidate's training
    would repeat it bit for bit): its losses and weights are taken instead of training it again."""
    original = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    cands, paper_report = hg_candidates(layer, X, Y, kwargs, plan.tp, opts, opts["batch_size"])
    records = [{"source": source, "perm": perm} for source, perm in cands]
    train = range(len(cands))
    if opts["hg_search"] == "proxy":
        for r in records:
            layer.load_state_dict(original)
            r["zero_shot"] = _zero_shot_error(layer, plan.tp, plan.tiers[i], r["perm"], X, Y, kwargs, opts["batch_size"])
        train = [0, min(range(1, len(cands)), key=lambda k: (records[k]["zero_shot"], k))]
    best, best_state = None, None
    reused = False
    for n in train:
        layer.load_state_dict(original)
        r = records[n]
        if n == 0 and identity is not None:  # records[0] is the identity ordering (hg_candidates)
            entry, file = identity
            layer.load_state_dict(load_file(str(file)))
            r |= {k: entry[k] for k in ("loss_before", "epoch_losses", "loss_after")}
            reused = True
        else:
            r |= _train_candidate(layer, i, plan, r["perm"], X, Y, kwargs, opts, progress,
                                  f"block {i} {r['source']} {n}")
        r.setdefault("zero_shot", r["loss_before"])  # the same quantity: permuted, before training
        if best is None or r["loss_after"] < best["loss_after"]:
            best, best_state = r, {k: v.detach().clone() for k, v in layer.state_dict().items()}
    layer.load_state_dict(best_state)
    ident = records[0]
    chosen = best["perm"] if best["source"] != "identity" else None
    return {"head_perm": chosen, "head_grouping": paper_report, "hg_chosen": best["source"],
            "hg_search": opts["hg_search"], "hg_trained": len(train) - reused, "hg_identity_reused": reused,
            "loss_before_hg": ident["loss_before"], "loss_before": best["loss_before"],
            "epoch_losses": best["epoch_losses"], "loss_after": best["loss_after"],
            "identity": {k: ident[k] for k in ("loss_before", "loss_after")},
            "hg_candidates": [{k: r.get(k) for k in ("source", "perm", "zero_shot", "loss_before", "epoch_losses",
                                                     "loss_after")} for r in records]}


def _distill_one(layer, i: int, plan: SPDPlan, X: torch.Tensor, Y: torch.Tensor, store, out_dir: Path, dtype,
                 opts: dict, progress: bool, layer_config=None, identity: dict | None = None) -> dict:
    """HG search (ESB) + B2B of one block in place on inputs X, targets Y (N, L, D); writes its weights
    atomically; returns its report entry. identity: the block's B2B-alone manifest entry, if out_dir has it."""
    t0 = time.perf_counter()
    model_dtype = next(layer.parameters()).dtype
    layer.to(dtype)  # train in fp32 by default; Parameter objects are kept, only their data is cast
    kwargs = store.block_kwargs(next(layer.parameters()).device, dtype)
    entry = {"tier": plan.tiers[i], "head_perm": None}
    hg = plan.tiers[i] == "ESB" and opts["head_grouping"]
    try:
        if hg:
            entry |= _hg_search(layer, i, plan, X, Y, kwargs, opts, progress,
                                identity and (identity, out_dir / identity["file"]))
        else:
            entry |= _train_candidate(layer, i, plan, None, X, Y, kwargs, opts, progress, f"block {i}")
    finally:
        layer.to(model_dtype)
    entry["target_mean_square"] = float(Y.float().pow(2).mean())  # the scale the MSE is relative to
    seconds = time.perf_counter() - t0
    entry["minutes"] = seconds / 60
    runs = entry.get("hg_trained", 1)
    trained = runs * opts["epochs"] * X.shape[0] * X.shape[1]  # tokens through forward + backward (3x a forward)
    entry["cost"] = throughput(trained, 3 * trained * block_flops_per_token(layer_config, X.shape[1]), seconds)
    entry["hg"] = hg
    entry["file"] = f"block_{i}{'_hg' if hg else ''}.safetensors"
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
    from spd.calibration import calibration_tokens, resolve_auto_
    from spd.export import export_
    from spd.load import load_model
    from spd.perplexity import windows_perplexity
    from spd.run import meta, start_run, to_plain

    if not cfg.spd.plan:
        raise PlanError("spd-distill needs spd.plan=PATH/plan.json (written by spd-rank)")
    run_dir = start_run(cfg.run_dir, resolve_auto_(cfg), stage="distill", tp=cfg.parallel.tp)
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
