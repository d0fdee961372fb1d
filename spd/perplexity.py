"""Perplexity, one path: lm-eval's rolling windows, one scorer, for spd-ppl, ranking, planning and the study.

A token sequence t_1..t_n is cut by lm-eval's own get_rolling_token_windows(tokens, prefix, max_length,
context_len=1) + make_disjoint_window into disjoint windows; the first conditions on the prefix token
(BOS, else EOS), so every token is scored exactly once:

    NLL = - sum_t log p(t_t | t_<t within its window)

score_windows is the only scorer: the lm-eval adapter (spd.lm_eval_model.SPDLM) uses it for every
loglikelihood request, so spd-ppl on WikiText-2 and lm-eval's spd_wikitext give the same numbers.
Document perplexity: token ppl = exp(NLL / tokens), word ppl = exp(NLL / words), bits per byte =
NLL / (bytes ln 2), words and bytes counted on the raw document as lm-eval's wikitext does, the text
scored after the same preprocessing (`wikitext`: lm-eval's wikitext_detokenizer). Calibration windows
(N, L) are scored as N sequences of L tokens, each window's first token given the prefix token.
"""

from __future__ import annotations

import math
import re
import time
from typing import Callable

import torch
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from spd.errors import SPDError
from spd.placement import input_device

PREPROCESS = ("wikitext",)


def rolling_windows(tokens: list[int], prefix: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's disjoint (context, continuation) windows scoring every token of `tokens` once."""
    return [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, prefix, max_length, context_len=1)]


def prefix_token(tokenizer=None, config=None) -> int:
    """The token the first window conditions on: BOS, else EOS (lm-eval's prefix_token_id), else 0."""
    for src in (tokenizer, config):
        for name in ("bos_token_id", "eos_token_id"):
            t = getattr(src, name, None) if src is not None else None
            if isinstance(t, int):
                return t
    return 0


def model_logits(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """input_ids (B, S) -> logits (B, S, V) of a transformers model (no KV cache)."""
    return lambda ids: model(input_ids=ids, use_cache=False).logits


def target_logprob(logits: torch.Tensor, targets: torch.Tensor,
                   reduce: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(targets), every target is the argmax) for logits (..., k, V) and targets (..., k);
    reduce=False: per target (log p, is the argmax)."""
    logp = logits.float().log_softmax(-1)  # (..., k, V)
    lp, top = logp.gather(-1, targets[..., None])[..., 0], logp.argmax(-1) == targets
    return (lp.sum(-1), top.all(-1)) if reduce else (lp, top)


def calibration_inputs(tokens: torch.Tensor, prefix: int) -> torch.Tensor:
    """The model inputs that score (N, L) calibration windows as lm-eval's rolling windows do: the prefix
    token, then each window's first L - 1 tokens (N, L). Ranking and distillation see exactly these rows."""
    return torch.cat([torch.full_like(tokens[:, :1], prefix), tokens[:, :-1]], dim=1)


@torch.no_grad()
def score_windows(logits_fn: Callable[[torch.Tensor], torch.Tensor], windows: list[tuple[list[int], list[int]]],
                  batch_size: int, pad_id: int = 0, device=None, progress: bool = False,
                  desc: str = "score") -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), continuation is greedy) per (context, continuation) window.

    The input row is (context + continuation)[:-1] (the caller truncates it to the model's length); rows
    are sorted longest first (stable), cut into batches of batch_size and right-padded, so a causal model
    needs no attention mask and the forward calls depend only on the windows. Results in input order.
    """
    order = sorted(range(len(windows)), key=lambda i: -(len(windows[i][0]) + len(windows[i][1])))
    out: list[tuple[float, bool] | None] = [None] * len(windows)
    bar = tqdm(total=len(windows), desc=desc, disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        rows = [(windows[i][0] + windows[i][1])[:-1] for i in idx]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, S)
        for b, row in enumerate(rows):
            ids[b, :len(row)] = torch.tensor(row, dtype=torch.long)
        logits = logits_fn(ids.to(device) if device is not None else ids)  # (B, S, V)
        if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
            raise SPDError(f"the model returned logits of shape {tuple(logits.shape)} for input ids "
                             f"{tuple(ids.shape)}; expected (B, S, V)")
        # every scored position of the batch in one (T, V) gather: one log_softmax and one copy to the host
        at_b, at_t, targets = [], [], []
        for b, i in enumerate(idx):
            cont = windows[i][1]
            n, k = len(rows[b]), len(cont)
            at_b += [b] * k
            at_t += range(n - k, n)
            targets += cont
        dev = logits.device
        picked = logits[torch.tensor(at_b, device=dev), torch.tensor(at_t, device=dev)]  # (T, V)
        logp, greedy = target_logprob(picked, torch.tensor(targets, device=dev), reduce=False)
        logp, greedy = logp.double().cpu().tolist(), greedy.cpu().tolist()
        start = 0
        for i in idx:  # per window: a sum in float64 on the host, in token order (deterministic)
            k = len(windows[i][1])
            out[i] = (float(sum(logp[start:start + k])), all(greedy[start:start + k]))
            start += k
        bar.update(len(idx))
    bar.close()
    return out


def rolling_nll(model, token_lists: list[list[int]], prefix: int, max_length: int, batch_size: int,
                progress: bool = False) -> list[float]:
    """NLL of each token list, in lm-eval's rolling windows of max_length tokens."""
    windows, owner = [], []
    for j, tokens in enumerate(token_lists):
        for w in rolling_windows(tokens, prefix, max_length):
            windows.append(w)
            owner.append(j)
    device = input_device(model)
    nll = [0.0] * len(token_lists)
    for j, (logp, _) in zip(owner, score_windows(model_logits(model), windows, batch_size, prefix, device,
                                                 progress, "perplexity")):
        nll[j] -= logp
    return nll


def windows_perplexity(model, tokens: torch.Tensor, batch_size: int = 4, progress: bool = False) -> float:
    """Perplexity of (N, L) calibration windows, every token scored (the first given the prefix token)."""
    rows = tokens.tolist()
    nll = rolling_nll(model, rows, prefix_token(config=model.config), tokens.shape[1], batch_size, progress)
    return math.exp(sum(nll) / tokens.numel())


def preprocess(text: str, how: str | None) -> str:
    """The text that is scored: as it is, or lm-eval's wikitext detokenizer (how="wikitext")."""
    if how is None:
        return text
    if how == "wikitext":
        from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

        return wikitext_detokenizer({"page": text})
    raise SPDError(f"unknown ppl.preprocess {how!r}; valid: null, {', '.join(PREPROCESS)}")


def document_perplexity(model, tokenizer, docs: list[str], max_length: int = 2048, batch_size: int = 4,
                        preprocess_as: str | None = None, progress: bool = True) -> dict:
    """Token and word perplexity and bits per byte over documents (see the module docstring)."""
    from spd.cost import model_flops_per_token, throughput

    prefix = prefix_token(tokenizer, model.config)
    ids = [tokenizer(preprocess(d, preprocess_as), add_special_tokens=False).input_ids for d in docs]
    t0 = time.perf_counter()
    nll = sum(rolling_nll(model, ids, prefix, max_length, batch_size, progress))
    seconds = time.perf_counter() - t0
    tokens = sum(map(len, ids))
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    return {
        "token_perplexity": math.exp(nll / tokens),
        "word_perplexity": math.exp(nll / words),
        "bits_per_byte": nll / (nbytes * math.log(2)),
        "nll": nll, "tokens": tokens, "words": words, "bytes": nbytes, "documents": len(docs),
        "max_length": max_length, "preprocess": preprocess_as,
        "cost": throughput(tokens, tokens * model_flops_per_token(model.config, min(max_length, max(map(len, ids)))),
                           seconds),
    }


def perplexity_table(result: dict) -> str:
    """A short Markdown table of a perplexity result."""
    rows = [("word perplexity", f"{result['word_perplexity']:.4f}"),
            ("token perplexity", f"{result['token_perplexity']:.4f}"),
            ("bits per byte", f"{result['bits_per_byte']:.4f}"),
            ("documents / tokens", f"{result['documents']} / {result['tokens']}")]
    return "| measure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def run_perplexity(cfg) -> dict:
    """spd-ppl: rolling perplexity of cfg.model (with cfg.spd.plan applied, if any) -> run_dir/perplexity.json."""
    from spd.calibration import read_texts
    from spd.load import load_model
    from spd.plan import SPDPlan
    from spd.run import start_run, write_json_atomic
    from spd.surgery import apply_plan_

    run_dir = start_run(cfg.run_dir, cfg, stage="perplexity", tp=cfg.parallel.tp)
    model, tokenizer = load_model(cfg.model)
    plan = SPDPlan.load(cfg.spd.plan) if cfg.spd.plan else None
    if plan:
        apply_plan_(model, plan)
    docs = read_texts(cfg.ppl.data, cfg.ppl.field)[: cfg.ppl.limit]
    result = document_perplexity(model, tokenizer, docs, cfg.ppl.max_length, cfg.ppl.batch_size, cfg.ppl.preprocess)
    result |= {"schema": "spd.perplexity/1", "model": cfg.model.name, "data": cfg.ppl.data,
               "plan": plan.to_dict() if plan else None}
    write_json_atomic(run_dir / "perplexity.json", result)
    print(perplexity_table(result))
    print(f"-> {run_dir / 'perplexity.json'}")
    return result
