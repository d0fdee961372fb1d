"""Block sensitivity to SPD, and plans chosen from it.

Backward sweep (paper): switch blocks to zero-shot SPD one at a time from the last block backwards,
keeping the earlier switches; sensitivity(i) = ppl(after switching i) - ppl(before). It is path
dependent, so the isolated variant is offered too: sensitivity(i) = ppl(only block i SPD) - ppl(no SPD).
Perplexity is measured on calibration windows.

Cost: when switching block i, blocks 0..i-1 are still dense (backward: only later blocks were switched;
isolated: only i is), so their output is the original model's hidden state h_i. Given the captured
states (spd.activations, the same capture distillation uses), each step runs only blocks i..L-1 from h_i:
L(L+1)/2 block forwards for a ranking instead of L^2. The result is the same ranking (tests/test_sensitivity.py). Both write `spd.sensitivity/1` JSON: model, R, method,
calibration spec, baseline perplexity, per-block perplexity and sensitivity, the ascending order.

Plans: the k least sensitive blocks (k from a fraction or a count) become SPD blocks; their tiers come
from thresholds on relative sensitivity (sensitivity / baseline ppl), or from counts (the most sensitive
chosen blocks become ESB, the next SB). The paper does not say how its thresholds were set: the defaults
here (SB above 1% of baseline ppl, ESB above 10%) are ours, and configurable.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from spd.block import decoder_layers, remove_spd_, set_spd_
from spd.config import CalibConfig, SPDConfig
from spd.cost import block_flops_per_token
from spd.errors import SPDError
from spd.perplexity import target_logprob, windows_perplexity
from spd.placement import input_device
from spd.plan import SPDPlan
from spd.run import read_json, write_json_atomic

SCHEMA = "spd.sensitivity/1"
METHODS = ("backward", "isolated")
DEFAULT_SB_REL, DEFAULT_ESB_REL = 0.01, 0.10


def rank_blocks(model, tokens, tp: int, method: str = "backward", batch_size: int = 4,
                progress_file: Path | None = None, spec: dict | None = None, key: str | None = None,
                store=None, capture=None, max_states: int = 1) -> dict:
    """Per-block sensitivity of `model` at degree tp on (N, L) calibration tokens (see module doc).

    store: the original model's hidden states at every block boundary for these windows (an ActivationStore
    of capture_hidden_states on calibration_inputs), or a callable giving it: each step then starts at the
    switched block's cached input. Without it every step is a full forward (the reference).
    capture: instead of store, a callable capturing the dense model's inputs of given blocks (an
    ActivationStore): the steps then run in chunks of max_states blocks, each chunk captured on its own
    (a forward up to its last block), so at most max_states hidden states are held at a time.
    With progress_file, every finished block is recorded there atomically and a re-run with the same key
    (spd.artifacts: model, R, method, calibration) resumes after it.
    """
    if method not in METHODS:
        raise SPDError(f"unknown ranking method {method!r}; valid: {', '.join(METHODS)}")
    n = len(decoder_layers(model))
    done = read_json(progress_file) if progress_file else None
    key = key or {"tp": tp, "method": method, "calibration": spec or {}}
    if not done or done.get("key") != key:
        done = {"key": key, "baseline_ppl": None, "ppl": {}, "seconds": {}, "block_forwards": 0}
    remove_spd_(model)
    if done["baseline_ppl"] is None:
        done["baseline_ppl"] = windows_perplexity(model, tokens, batch_size)
        done["block_forwards"] += n
    base = done["baseline_ppl"]
    order = list(range(n - 1, -1, -1))  # backward: last block first
    todo = [i for i in order if str(i) not in done["ppl"]]
    if todo and callable(store):
        store = store()
    chunks = [todo[c:c + max_states] for c in range(0, len(todo), max_states)] if capture else [todo]
    for chunk in chunks:
        if capture:  # the dense model's inputs of this chunk's blocks only: bounded memory
            remove_spd_(model)
            store = capture(chunk)
            done["block_forwards"] += max(chunk) + 1
        for i in tqdm(chunk, desc=f"rank ({method}, R={tp})"):
            switched = [j for j in order[: order.index(i) + 1]] if method == "backward" else [i]
            start = time.perf_counter()
            set_spd_(model, tp, {j: "ISB" for j in switched})
            if store is None:
                done["ppl"][str(i)] = windows_perplexity(model, tokens, batch_size)
                done["block_forwards"] += n
            else:
                done["ppl"][str(i)] = suffix_perplexity(model, store, i, tokens, batch_size)
                done["block_forwards"] += n - i
            done["seconds"][str(i)] = time.perf_counter() - start
            if progress_file:
                write_json_atomic(progress_file, done)
        if capture:
            store.cleanup()
    remove_spd_(model)
    ppl = {i: done["ppl"][str(i)] for i in range(n)}
    if method == "backward":
        before = {i: ppl[i + 1] if i + 1 < n else base for i in range(n)}
    else:
        before = {i: base for i in range(n)}
    sens = {i: ppl[i] - before[i] for i in range(n)}
    seconds = sum(done["seconds"].values())
    tokens_done = done["block_forwards"] * tokens.numel()  # block-token forwards
    flops = tokens_done * block_flops_per_token(model.config, tokens.shape[1])
    return {
        "schema": SCHEMA, "tp": tp, "method": method, "num_layers": n, "calibration": spec or {},
        "baseline_ppl": base,
        "blocks": [{"block": i, "ppl": ppl[i], "sensitivity": sens[i], "relative": sens[i] / base,
                    "seconds": done["seconds"].get(str(i))} for i in range(n)],
        "order": sorted(range(n), key=lambda i: sens[i]),  # least sensitive first
        "seconds_total": seconds,
        "cost": {"block_forwards": done["block_forwards"], "cached_inputs": store is not None or capture is not None,
                 "max_states": max_states if capture else None,
                 "block_tokens_per_s": tokens_done / seconds if seconds else None,
                 "tflop_per_s": flops / seconds / 1e12 if seconds else None},
    }


@torch.no_grad()
def suffix_perplexity(model, store, start: int, tokens: torch.Tensor, batch_size: int = 4) -> float:
    """Calibration perplexity of the model as it is now, run from block `start` on its cached input h_start.

    Equal to windows_perplexity when blocks 0..start-1 are those that produced the cached states (dense).
    tokens: (N, L) the windows (the targets); the store holds h_start of calibration_inputs(tokens).
    """
    layers = decoder_layers(model)
    device, dtype = input_device(model), model.get_input_embeddings().weight.dtype
    kwargs = store.block_kwargs(device, dtype)  # a block on another device gets them moved by its hook
    X = store.get(start)  # (N, L, D)
    nll = 0.0
    for s in range(0, len(X), batch_size):
        h = X[s:s + batch_size].to(device, dtype)  # (B, L, D)
        for layer in layers[start:]:
            h = layer(h, **kwargs)
            h = h[0] if isinstance(h, tuple) else h
        logits = model.lm_head(model.model.norm(h))  # (B, L, V)
        logp, _ = target_logprob(logits, tokens[s:s + batch_size].to(logits.device))
        nll -= float(logp.sum())
    return math.exp(nll / tokens.numel())


def spd_block_count(fraction: float, n: int) -> int:
    """SPD blocks for a fraction of n blocks: the nearest whole number, halves rounded UP (0.75 of 30 -> 23;
    Python's round() would give 22, rounding halves to even). A float's error (0.1 * 30) is not a half."""
    if not 0.0 <= fraction <= 1.0:
        raise SPDError(f"spd.fraction={fraction} must lie in [0, 1] (the share of blocks that become SPD blocks)")
    return min(n, math.floor(fraction * n + 0.5 + 1e-9))


def plan_from_ranking(ranking: dict, cfg: SPDConfig, model_name: str = "", fraction: float | None = None) -> SPDPlan:
    """The SPD plan of a ranking: which blocks (least sensitive first) and their tiers (see module doc)."""
    n, order = ranking["num_layers"], ranking["order"]
    fraction = cfg.fraction if fraction is None else fraction
    k = n if fraction is None else spd_block_count(fraction, n)
    chosen = order[:k]
    rel = {b["block"]: b["relative"] for b in ranking["blocks"]}
    if cfg.sb_count is not None or cfg.esb_count is not None:
        by_sens = sorted(chosen, key=lambda i: -rel[i])
        esb = set(by_sens[: cfg.esb_count or 0])
        sb = set(by_sens[len(esb): len(esb) + (cfg.sb_count or 0)])
        tiers = {i: "ESB" if i in esb else "SB" if i in sb else "ISB" for i in chosen}
        rule = {"sb_count": cfg.sb_count, "esb_count": cfg.esb_count}
    else:
        sb_t = DEFAULT_SB_REL if cfg.sb_threshold is None else cfg.sb_threshold
        esb_t = DEFAULT_ESB_REL if cfg.esb_threshold is None else cfg.esb_threshold
        tiers = {i: "ESB" if rel[i] > esb_t else "SB" if rel[i] > sb_t else "ISB" for i in chosen}
        rule = {"sb_threshold_rel": sb_t, "esb_threshold_rel": esb_t}
    return SPDPlan(tp=ranking["tp"], num_layers=n, tiers=tiers, model=model_name,
                   source={"ranking": ranking["method"], "fraction": k / n, **rule})


def ranking_table(ranking: dict, plan: SPDPlan | None = None) -> str:
    """A short Markdown table: blocks least sensitive first, with their perplexity increase and tier."""
    rows = sorted(ranking["blocks"], key=lambda b: ranking["order"].index(b["block"]))
    tiers = plan.tiers if plan else {}
    lines = [f"baseline calibration perplexity {ranking['baseline_ppl']:.4f} ({ranking['method']}, R={ranking['tp']})",
             "| block | ppl increase | relative | tier |", "|---|---|---|---|"]
    lines += [f"| {b['block']} | {b['sensitivity']:+.4f} | {b['relative']:+.2%} | {tiers.get(b['block'], '-')} |"
              for b in rows]
    return "\n".join(lines)


def plot_sensitivity(ranking: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = ranking["blocks"]
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(blocks)), 3.2))
    ax.bar([b["block"] for b in blocks], [b["sensitivity"] for b in blocks], color="tab:blue")
    ax.set_xlabel("block")
    ax.set_ylabel("perplexity increase")
    ax.set_title(f"SPD sensitivity ({ranking['method']}, R={ranking['tp']}, base ppl {ranking['baseline_ppl']:.2f})")
    ax.set_yscale("symlog", linthresh=max(1e-3, abs(ranking["baseline_ppl"]) * 1e-3))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def calibration_spec(cfg: CalibConfig) -> dict:
    return asdict(cfg)


RANK_ALGO = 3  # bump when a ranking's numbers change for the same settings (2: lm-eval's rolling windows)


def rank_settings(cfg, model=None) -> dict:
    """What a ranking depends on (cfg: RunApp): the model's weights, R, the method and the calibration set."""
    from spd.artifacts import model_fingerprint

    return {"model": model_fingerprint(cfg.model, model), "tp": cfg.parallel.tp, "method": cfg.spd.ranking,
            "calibration": calibration_spec(cfg.calib), "algo": RANK_ALGO}


def all_states_fit(model, tokens: torch.Tensor, cfg) -> bool:
    """Whether every block boundary's hidden state of the calibration windows fits spd.rank_state_gb."""
    from spd.activations import state_bytes

    n = len(decoder_layers(model))
    dtype = model.get_input_embeddings().weight.dtype
    return state_bytes(*tokens.shape, model.config.hidden_size, range(n), dtype) <= cfg.spd.rank_state_gb * 2**30


def bounded_capture(model, tokens, cfg) -> tuple[object, int]:
    """(capture(blocks) -> ActivationStore of the dense model's inputs of those blocks, how many inputs fit in
    spd.rank_state_gb) for a ranking that holds only a chunk of block inputs at a time."""
    from spd.activations import capture_hidden_states, state_bytes
    from spd.perplexity import calibration_inputs, prefix_token

    one = state_bytes(*tokens.shape, model.config.hidden_size, [0], model.get_input_embeddings().weight.dtype) / 2
    inputs = calibration_inputs(tokens, prefix_token(config=model.config))

    def capture(blocks):
        return capture_hidden_states(model, inputs, blocks, cfg.calib.batch_size, progress=False, inputs_only=True)

    return capture, max(1, int(cfg.spd.rank_state_gb * 2**30 // one))


def ranking_in(run_dir: Path, model, tokens, cfg, store=None) -> dict:
    """The ranking stored in run_dir for cfg's settings (RunApp: rank_settings), computed there when it is
    missing or was made with other settings; resumes block by block. tokens: (N, L) or a callable giving them.
    store: the captured hidden states of these windows, or a callable giving them (see rank_blocks).
    Returns it with "reused": whether it was read rather than computed."""
    from spd.artifacts import key_of, read_if

    key = key_of(rank_settings(cfg, model))
    out = Path(run_dir) / "sensitivity.json"
    ranking = read_if(out, key)
    if ranking:
        return ranking | {"reused": True}
    tokens = tokens() if callable(tokens) else tokens
    capture, max_states = None, 1
    if not all_states_fit(model, tokens, cfg):  # keep a chunk of block inputs at a time (spd.rank_state_gb)
        (capture, max_states), store = bounded_capture(model, tokens, cfg), None
    ranking = rank_blocks(model, tokens, cfg.parallel.tp, cfg.spd.ranking,
                          cfg.calib.batch_size, progress_file=Path(run_dir) / "sensitivity.progress.json",
                          spec=calibration_spec(cfg.calib), key=key, store=store, capture=capture,
                          max_states=max_states)
    ranking |= {"model": cfg.model.name, "key": key, "settings": rank_settings(cfg, model)}
    write_json_atomic(out, ranking)
    (Path(run_dir) / "sensitivity.progress.json").unlink(missing_ok=True)
    plot_sensitivity(ranking, Path(run_dir) / "sensitivity.png")
    return ranking | {"reused": False}


def run_rank(cfg) -> dict:
    """spd-rank: ranking, plot and plan in cfg.run_dir (RunApp); resumes a crashed run block by block."""
    from spd.calibration import calibration_tokens
    from spd.load import load_model
    from spd.run import start_run
    from spd.surgery import apply_plan_

    run_dir = start_run(cfg.run_dir, cfg, stage="rank", tp=cfg.parallel.tp)
    model, tokenizer = load_model(cfg.model)
    apply_plan_(model, SPDPlan(tp=cfg.parallel.tp, num_layers=len(decoder_layers(model))))  # validates R
    tokens = calibration_tokens(tokenizer, cfg.calib)
    stores = []

    def capture():  # every block boundary, spilled to disk above distill.spill_gb; removed after the ranking
        from spd.activations import capture_hidden_states, state_bytes
        from spd.perplexity import calibration_inputs, prefix_token

        n = len(decoder_layers(model))
        big = state_bytes(*tokens.shape, model.config.hidden_size, range(n), next(model.parameters()).dtype)
        spill = run_dir / "activations" if big > cfg.distill.spill_gb * 2**30 else None
        stores.append(capture_hidden_states(model, calibration_inputs(tokens, prefix_token(config=model.config)),
                                            range(n), cfg.calib.batch_size, spill))
        return stores[0]

    try:
        ranking = ranking_in(run_dir, model, tokens, cfg, store=capture)
    finally:
        for st in stores:
            st.cleanup()
    plan = plan_from_ranking(ranking, cfg.spd, cfg.model.name)
    plan.save(run_dir / "plan.json")
    print(ranking_table(ranking, plan))
    print(f"plan: {len(plan.blocks)}/{plan.num_layers} SPD blocks at R={plan.tp} -> {run_dir / 'plan.json'}")
    return ranking
