"""Perplexity: of calibration windows (for ranking), and rolling over documents (like lm-eval's wikitext).

Rolling perplexity of a document t_1..t_n: the sequence [BOS, t_1, ..., t_n] is cut into disjoint windows
of max_length inputs, each predicting the next token (lm-eval's rolling windows with context_len = 1), so
every token is scored once. token ppl = exp(NLL / tokens), word ppl = exp(NLL / words),
bits per byte = NLL / (bytes * ln 2), words split on whitespace and bytes counted in UTF-8 as lm-eval does.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def sequence_nll(model, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL per row: ids, targets (B, L) with -100 marking unscored targets -> (B,)."""
    logits = model(ids.to(model.device)).logits.float()  # (B, L, V)
    nll = F.cross_entropy(logits.transpose(1, 2), targets.to(model.device), ignore_index=-100, reduction="none")
    return nll.sum(1).cpu()  # (B,)


@torch.no_grad()
def windows_perplexity(model, tokens: torch.Tensor, batch_size: int = 4, progress: bool = False) -> float:
    """Perplexity of (N, L) token windows, every token but each window's first predicted."""
    total, count = 0.0, 0
    for i in tqdm(range(0, len(tokens), batch_size), desc="ppl", disable=not progress, leave=False):
        batch = tokens[i:i + batch_size]
        targets = batch[:, 1:].clone()
        total += sequence_nll(model, batch[:, :-1], targets).sum().item()
        count += targets.numel()
    return math.exp(total / count)


def rolling_windows(ids: list[int], bos: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Disjoint (input, target) windows that score every token of ids once, the first given BOS."""
    seq = [bos] + ids
    return [(seq[s:s + max_length], seq[s + 1:s + max_length + 1]) for s in range(0, len(ids), max_length)]


@torch.no_grad()
def document_perplexity(model, tokenizer, docs: list[str], max_length: int = 2048, batch_size: int = 4,
                        progress: bool = True) -> dict:
    """Token and word perplexity and bits per byte over documents (rolling windows, batched)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    windows = [w for d in docs for w in rolling_windows(tokenizer(d, add_special_tokens=False).input_ids,
                                                         bos, max_length)]
    windows.sort(key=lambda w: -len(w[0]))  # similar lengths together: less padding
    nll, tokens = 0.0, 0
    for i in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress):
        chunk = windows[i:i + batch_size]
        width = len(chunk[0][0])
        ids = torch.tensor([w[0] + [bos] * (width - len(w[0])) for w in chunk])  # right padding
        tgt = torch.tensor([w[1] + [-100] * (width - len(w[1])) for w in chunk])
        nll += sequence_nll(model, ids, tgt).sum().item()
        tokens += sum(len(w[1]) for w in chunk)
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    return {
        "token_perplexity": math.exp(nll / tokens),
        "word_perplexity": math.exp(nll / words),
        "bits_per_byte": nll / (nbytes * math.log(2)),
        "nll": nll, "tokens": tokens, "words": words, "bytes": nbytes, "documents": len(docs),
        "max_length": max_length,
    }


def run_perplexity(cfg) -> dict:
    """spd-ppl: rolling perplexity of cfg.model (with cfg.spd.plan applied, if any) -> run_dir/perplexity.json."""
    from spd.calibration import read_texts
    from spd.load import load_model
    from spd.plan import SPDPlan
    from spd.run import start_run, write_json_atomic
    from spd.surgery import apply_spd_

    run_dir = start_run(cfg.run_dir, cfg, stage="perplexity", tp=cfg.parallel.tp)
    model, tokenizer = load_model(cfg.model)
    plan = SPDPlan.load(cfg.spd.plan) if cfg.spd.plan else None
    if plan:
        apply_spd_(model, plan)
    docs = read_texts(cfg.ppl.data, cfg.ppl.field)[: cfg.ppl.limit]
    result = document_perplexity(model, tokenizer, docs, cfg.ppl.max_length, cfg.ppl.batch_size)
    result |= {"schema": "spd.perplexity/1", "model": cfg.model.name, "data": cfg.ppl.data,
               "plan": plan.to_dict() if plan else None}
    write_json_atomic(run_dir / "perplexity.json", result)
    print(f"token ppl {result['token_perplexity']:.3f}, word ppl {result['word_perplexity']:.3f}, "
          f"bits/byte {result['bits_per_byte']:.4f} -> {run_dir / 'perplexity.json'}")
    return result
