"""lm-eval adapter `spd`: any logits function f(input_ids (B, S)) -> (B, S, V) plus a HF tokenizer.

Scores are plain sums of next-token log-probabilities:
  loglikelihood(c, x) = sum_{t in x} log softmax(f(c + x)[t - 1])[x_t], and is_greedy = every x_t is the
  argmax; loglikelihood_rolling(x) = the same sum over all of x, conditioned on the prefix token (BOS,
  else EOS), in lm-eval's rolling windows of max_length tokens; generate_until is greedy decoding.
Batches are right-padded, so a causal model needs no attention mask and never sees the padding of the
positions it is scored on. Requests are sorted by length (stable, longest first) and cut into batches of
the fixed `batch_size`: the order and shapes of forward calls depend only on the requests, so tensor-
parallel ranks that get the same requests make identical calls in the same order ("auto" is refused).

f is taken from the model object: its `logits(input_ids)` method if it has one (the tensor-parallel
runtime), else calling it (a transformers module; `.logits` of its output, or the tensor it returns).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

import torch
from tqdm import tqdm

import lm_eval.models  # noqa: F401  (fills lm-eval's model registry first, so `--model hf` still resolves)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from spd.errors import SPDError
from spd.load import load_model, load_pretrained, model_config_by_name
from spd.perplexity import rolling_windows, score_windows

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048  # when neither the caller nor the model's config gives a context length
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HFLM default


def logits_fn(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """The (B, S) -> (B, S, V) logits function of a model, runtime object or plain callable."""
    method = getattr(model, "logits", None)
    if callable(method):
        return method
    if not callable(model):
        raise SPDError(
            f"cannot score with a {type(model).__name__}: pass a module whose forward returns .logits or "
            "a (B, S, V) tensor, or an object with a logits(input_ids) method"
        )
    try:
        from transformers import PreTrainedModel

        is_hf = isinstance(model, PreTrainedModel)
    except ImportError:
        is_hf = False

    def call(input_ids: torch.Tensor) -> torch.Tensor:
        # use_cache=False: a scoring forward has no use for the KV cache transformers would build.
        out = model(input_ids=input_ids, use_cache=False) if is_hf else model(input_ids)
        return out.logits if hasattr(out, "logits") else out

    return call


@register_model("spd")
class SPDLM(TemplateLM):
    """lm-eval LM over any logits function; see the module docstring for the math and the batching.

    In-process: SPDLM(model=module_or_runtime, tokenizer=tok, batch_size=8, max_length=2048).
    From lm-eval's command line: --model spd --model_args pretrained=DIR[,gguf_file=F][,dtype=bfloat16]
    or model=<name of conf/model/*.yaml> (loaded with spd.load.load_model), plus plan=PATH/plan.json to
    evaluate with an SPD plan (spd.surgery.apply_plan_: tiers, head permutations, distilled blocks).
    """

    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = None,
        *,
        pretrained: str | None = None,
        gguf_file: str | None = None,
        dtype: str = "float32",
        revision: str | None = None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        device: str | None = None,
        add_bos_token: bool | None = None,
        progress: bool = True,
        max_batch_size: int | None = None,  # passed by lm-eval's CLI; only meaningful with "auto"
        plan: str | None = None,
    ) -> None:
        super().__init__()
        loaded = isinstance(model, str) or pretrained is not None
        if isinstance(model, str):
            model, tokenizer = load_model(model_config_by_name(model))
        elif pretrained is not None:
            model, loaded_tokenizer = load_pretrained(pretrained, gguf_file, dtype, revision)
            tokenizer = tokenizer or loaded_tokenizer
        if model is None or tokenizer is None:
            raise SPDError("SPDLM needs model= and tokenizer=, or pretrained=PATH, or model=<conf/model name>")
        if plan is not None:  # an SPD plan file (spd-rank, spd-distill, spd-study), put on through apply_plan_
            from spd.plan import SPDPlan
            from spd.surgery import apply_plan_

            apply_plan_(model, SPDPlan.load(plan))
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)

        self._device = self._place(model, device, move=loaded)
        if isinstance(model, torch.nn.Module):
            model.eval()  # dropout off; a runtime object manages its own state
        self.model = model
        self.tokenizer = tokenizer
        self._logits = logits_fn(model)
        self.batch_size = batch_size
        self.max_length = max_length
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.progress = progress
        self.forwarded = {"tokens": 0, "rows": 0}  # what the model computed (padding included): the stage's cost
        self.pad_token_id = next(
            (t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0
        )

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _place(model, device: str | None, move: bool) -> torch.device:
        """The device input ids go to: `device`, else the model's own; a model we loaded is moved there."""
        if device is None or not move:
            if device is not None:
                return torch.device(device)
            if isinstance(model, torch.nn.Module) and hasattr(model, "get_input_embeddings"):
                from spd.placement import input_device

                return input_device(model)  # a model split over devices: its embedding's device
            if isinstance(model, torch.nn.Module):
                param = next(model.parameters(), None)
                return param.device if param is not None else torch.device("cpu")
            return torch.device(getattr(model, "device", "cpu"))
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            log.warning("device=%s requested but CUDA is not available: using cpu", device)
            device = "cpu"
        model.to(device)
        return torch.device(device)

    # ------------------------------------------------------------------ settings
    @property
    def batch_size(self) -> int:
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int | str) -> None:
        if isinstance(value, str) and not value.isdigit():
            raise SPDError(
                f"batch_size={value!r}: SPDLM needs a fixed integer batch size (tensor-parallel ranks must "
                "make identical forward calls, and 'auto' probes per process); pass e.g. batch_size=8"
            )
        if int(value) < 1:
            raise SPDError(f"batch_size must be >= 1, got {value}")
        self._batch_size = int(value)

    @property
    def max_length(self) -> int:
        return self._max_length

    @max_length.setter
    def max_length(self, value: int | None) -> None:
        """The context length used: `value` (default DEFAULT_MAX_LENGTH), capped at the model's positions."""
        cap = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        length = int(value) if value else (cap or DEFAULT_MAX_LENGTH)
        if cap and length > cap:
            log.warning("max_length=%d exceeds the model's %d positions: using %d", length, cap, cap)
            length = cap
        self._max_length = length

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def get_model_info(self) -> dict:
        """Provenance that lm-eval copies into results['config']."""
        info = {"model_class": type(self.model).__name__, "max_length": self.max_length}
        if isinstance(self.model, torch.nn.Module):
            info["model_num_parameters"] = sum(p.numel() for p in self.model.parameters())
            param = next(self.model.parameters(), None)
            info["model_dtype"] = str(param.dtype) if param is not None else None
        return info

    # ------------------------------------------------------------------ tokenizer
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids; special tokens as the tokenizer adds them by default, unless add_bos_token says."""
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            bos = self.tokenizer.bos_token
            if bos and string.startswith(bos):
                add_special_tokens = False
        extra = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **extra)

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def forward_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, S, V) of input ids (B, S)."""
        self.forwarded["tokens"] += ids.numel()
        self.forwarded["rows"] += ids.shape[0]
        return self._logits(ids.to(self._device))

    def forward(self, rows: list[list[int]]) -> torch.Tensor:
        """Logits (B, S, V) of right-padded rows, S = the longest row (greedy decoding)."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)  # (B, S)
        for b, row in enumerate(rows):
            ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        logits = self.forward_logits(ids)
        if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
            raise SPDError(
                f"the model returned logits of shape {tuple(logits.shape)} for input ids {tuple(ids.shape)}; "
                "expected (B, S, V)"
            )
        return logits

    # ------------------------------------------------------------------ lm-eval requests
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, is_greedy) for each ((context, continuation), ctx_ids, cont_ids),
        scored by spd.perplexity.score_windows (the project's one scorer) on left-truncated rows."""
        windows = []
        for _, ctx, cont in requests:
            if not 0 < len(cont) <= self.max_length:
                raise SPDError(
                    f"a continuation of {len(cont)} tokens does not fit max_length={self.max_length}; "
                    "raise max_length (up to the model's positions)"
                )
            row = (ctx + cont)[-(self.max_length + 1):]  # left-truncated: the input is row[:-1]
            windows.append((row[: len(row) - len(cont)], cont))
        out = score_windows(self.forward_logits, windows, self.batch_size, self.pad_token_id, self._device,
                            progress=not disable_tqdm and self.progress, desc="loglikelihood")
        for (key, _, _), answer in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, in lm-eval's disjoint rolling windows (spd.perplexity)."""
        windows, owner = [], []  # owner[w]: the text window w belongs to
        texts = [req.args[0] for req in requests]
        for j, text in enumerate(texts):
            # No special tokens: the prefix token is the text's only conditioning, as lm-eval documents.
            for ctx, cont in rolling_windows(self.tok_encode(text, add_special_tokens=False),
                                             self.prefix_token_id, self.max_length):
                windows.append((None, ctx, cont))
                owner.append(j)
        totals = [0.0] * len(texts)
        for j, (logp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[j] += logp
        for text, total in zip(texts, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, each cut before the first of its `until` strings or at EOS."""
        args = [req.args for req in requests]
        keys = [json.dumps(kw, sort_keys=True, default=str) for _, kw in args]
        encs = [self.tok_encode(ctx) or [self.prefix_token_id] for ctx, _ in args]
        # Same generation settings together, longest first; ties keep request order.
        order = sorted(range(len(args)), key=lambda i: (keys[i], -len(encs[i])))
        out: list[str | None] = [None] * len(args)
        bar = tqdm(total=len(args), desc="generate_until", disable=disable_tqdm or not self.progress)
        groups: list[list[int]] = []
        for i in order:
            if groups and keys[groups[-1][0]] == keys[i] and len(groups[-1]) < self.batch_size:
                groups[-1].append(i)
            else:
                groups.append([i])
        for idx in groups:
            until, max_gen = self._gen_settings(args[idx[0]][1])
            if max_gen >= self.max_length:
                raise SPDError(f"max_gen_toks={max_gen} leaves no context at max_length={self.max_length}")
            texts = self.greedy([encs[i][-(self.max_length - max_gen) :] for i in idx], until, max_gen)
            for i, text in zip(idx, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", args[i], text)
            bar.update(len(idx))
        bar.close()
        return out

    def _gen_settings(self, kwargs: dict) -> tuple[list[str], int]:
        if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0.0:
            raise SPDError(f"SPDLM decodes greedily only; got generation kwargs {kwargs} (set do_sample: false)")
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_gen = kwargs.get("max_gen_toks", kwargs.get("max_new_tokens", self.max_gen_toks))
        return [s for s in until if s], int(max_gen)

    def greedy(self, contexts: list[list[int]], until: list[str], max_gen: int) -> list[str]:
        """Greedy decoding of a batch, recomputing the full prefix each step (no KV cache: any f works).

        Every row takes part in every step until all are done, so the number and shapes of forward calls
        depend only on the inputs and the (replicated) logits.
        """
        lens = [len(c) for c in contexts]
        ids = [list(c) + [self.pad_token_id] * max_gen for c in contexts]
        gen: list[list[int]] = [[] for _ in contexts]
        done = [False] * len(contexts)
        for _ in range(max_gen):
            width = max(lens)
            logits = self.forward([row[:width] for row in ids])  # (B, S, V)
            last = torch.tensor(lens, device=logits.device) - 1
            rows = torch.arange(len(ids), device=logits.device)
            nxt = logits[rows, last].argmax(-1).tolist()  # (B,)
            for b, tok in enumerate(nxt):
                if done[b]:
                    continue
                if tok == self.eot_token_id:
                    done[b] = True
                    continue
                gen[b].append(tok)
                ids[b][lens[b]] = tok
                lens[b] += 1
                done[b] = any(s in self.tok_decode(gen[b]) for s in until)
            if all(done):
                break
        texts = []
        for g in gen:
            text = self.tok_decode(g)
            for s in until:
                text = text.split(s)[0]
            texts.append(text)
        return texts
