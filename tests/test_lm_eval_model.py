"""SPDLM against direct log-softmax computations on a tiny seeded LLaMA, and a tiny lm-eval run."""

import json
import math
import os
import sys

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from spd.config import EvalConfig, RunApp
from spd.errors import SPDError
from spd.evaluate import evaluate, main
from spd.cli import lm_eval as cli
from spd.lm_eval_model import SPDLM
from spd.tasks.offline import data_dir, read_jsonl

# Batched (right-padded) and single-row fp32 forwards sum in different orders: agreement to ~1e-6
# relative per token; 1e-4 absolute on sums of up to ~60 token log-probs leaves ample margin.
ATOL = 1e-4
MAX_POSITIONS = 128


@pytest.fixture(scope="module")
def tok():
    """A 320-piece byte-level BPE trained on ASCII TinyStories paragraphs (every piece decodes to ASCII)."""
    texts = [r["text"] for r in read_jsonl(data_dir() / "tinystories_val.jsonl")[:400] if r["text"].isascii()]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"], show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS, bos_token_id=0, eos_token_id=1,
    )
    return LlamaForCausalLM(cfg).eval()


def logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1, one unpadded forward: (len(ids) - 1,)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def is_greedy(model, ids: list[int], n_ctx: int) -> bool:
    """Whether every token after the first n_ctx is the argmax given the tokens before it."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, n_ctx - 1 : -1]
    return bool((logits.argmax(-1) == torch.tensor(ids[n_ctx:])).all())


def greedy_ids(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    for _ in range(n):
        with torch.no_grad():
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids):]


def req(kind, *args):
    return Instance(kind, {}, tuple(args), 0)


def test_loglikelihood_matches_direct_log_softmax(model, tok):
    pairs = [
        ("Once upon a time, there was", " a little girl named Lily."),
        ("Tom", " ran home."),
        ("", "The cat sat on the mat."),
        ("She saw a big red ball in the park and", " she wanted to play with it all day long"),
        ("One day,", " the sun"),
    ]
    lm = SPDLM(model=model, tokenizer=tok, batch_size=3, max_length=64, progress=False)
    got = lm.loglikelihood([req("loglikelihood", c, x) for c, x in pairs])
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        if ctx:
            whole, n_ctx = tok.encode(ctx + cont), len(tok.encode(ctx))
        else:
            whole, n_ctx = [tok.bos_token_id] + tok.encode(cont), 1
        assert len(whole) - n_ctx > 1  # multi-token continuations
        assert ll == pytest.approx(logprobs(model, whole)[n_ctx - 1 :].sum().item(), abs=ATOL)
        assert greedy == is_greedy(model, whole, n_ctx)


def test_greedy_flag(model, tok):
    ctx = tok.encode("Once upon a time")
    best = greedy_ids(model, ctx, 3)
    worse = best[:2] + [(best[2] + 1) % len(tok)]
    lm = SPDLM(model=model, tokenizer=tok, batch_size=2, progress=False)
    (ll_best, g_best), (ll_worse, g_worse) = lm._loglikelihood_tokens([(None, ctx, best), (None, ctx, worse)])
    assert g_best and not g_worse and ll_best > ll_worse


def test_rolling_equals_direct_sum(model, tok):
    text = " ".join(r["text"] for r in read_jsonl(data_dir() / "tinystories_val.jsonl")[:3])
    ids = tok.encode(text, add_special_tokens=False)
    L = 16
    assert len(ids) > 3 * L
    # lm-eval's scheme (LM.loglikelihood_rolling): the first window predicts ids[:L] from BOS + ids[:L-1];
    # each later one predicts the next <= L ids from the L ids before the last of them.
    want = logprobs(model, [tok.bos_token_id] + ids[: L]).sum().item()
    pos = L
    while pos < len(ids):
        end = min(pos + L, len(ids))
        window = ids[end - L - 1 : end]
        want += logprobs(model, window)[-(end - pos) :].sum().item()
        pos = end
    lm = SPDLM(model=model, tokenizer=tok, batch_size=4, max_length=L, progress=False)
    (got,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", text)])
    assert got == pytest.approx(want, abs=ATOL)
    # With room for the whole text, it is one forward over BOS + text.
    short = tok.decode(ids[:40])
    whole = [tok.bos_token_id] + tok.encode(short, add_special_tokens=False)
    lm.max_length = 64
    got = lm.loglikelihood_rolling([req("loglikelihood_rolling", short)])[0]
    assert got == pytest.approx(logprobs(model, whole).sum().item(), abs=ATOL)


def test_generate_until_stops_at_stop_strings(model, tok):
    lm = SPDLM(model=model, tokenizer=tok, batch_size=2, progress=False)
    contexts = ["Once upon a time", "Lily and her mom went to the big park to"]
    full = []
    for ctx in contexts:
        gen = greedy_ids(model, tok.encode(ctx), 12)
        if lm.eot_token_id in gen:
            gen = gen[: gen.index(lm.eot_token_id)]
        full.append(tok.decode(gen, skip_special_tokens=True))
    assert all(len(f) >= 6 for f in full)
    # No stop string: max_gen_toks ends it.
    free = lm.generate_until([req("generate_until", c, {"until": [], "max_gen_toks": 12}) for c in contexts])
    assert free == full
    # A stop string from the middle of each greedy text: output is the text before its first occurrence.
    stops = [f[len(f) // 2 : len(f) // 2 + 2] for f in full]
    kwargs = [{"until": [s, "\n\n\n\n"], "max_gen_toks": 12} for s in stops]
    reqs = [req("generate_until", c, kw) for c, kw in zip(contexts, kwargs)]
    cut = lm.generate_until(reqs)
    assert cut == [f[: f.index(s)] for f, s in zip(full, stops)]


class Recorder:
    """A stand-in tensor-parallel runtime: logits(input_ids) only, recording each call's shape."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def logits(self, input_ids):
        self.calls.append(tuple(input_ids.shape))
        with torch.no_grad():
            return self.model(input_ids).logits


def test_runtime_object_gets_identical_calls(model, tok):
    reqs = [req("loglikelihood", "Once upon a time" + " x" * i, " there was a dog") for i in range(7)]
    ranks = [Recorder(model), Recorder(model)]
    outs = [SPDLM(model=rank, tokenizer=tok, batch_size=3, progress=False).loglikelihood(reqs) for rank in ranks]
    assert ranks[0].calls == ranks[1].calls and len(ranks[0].calls) == 3
    assert all(b <= 3 for b, _ in ranks[0].calls)
    direct = SPDLM(model=model, tokenizer=tok, batch_size=7, progress=False).loglikelihood(reqs)
    assert [x for x, _ in outs[0]] == pytest.approx([x for x, _ in direct], abs=ATOL)


def test_auto_batch_size_is_refused(model, tok):
    with pytest.raises(SPDError, match="fixed integer batch size"):
        SPDLM(model=model, tokenizer=tok, batch_size="auto")


def test_registered_beside_lm_eval_models():
    assert get_model("spd") is SPDLM
    assert get_model("hf").__name__ == "HFLM"  # registering ours must not hide lm-eval's own


def test_agrees_with_lm_eval_hflm(model, tok):
    """lm-eval's own HFLM on the same module is the reference for all three request types."""
    from lm_eval.models.huggingface import HFLM

    ours = SPDLM(model=model, tokenizer=tok, batch_size=3, max_length=64, progress=False)
    ref = HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=64, device="cpu")
    pairs = [("Once upon a time, there was", " a little girl."), ("", "The cat sat."), ("Q: why?\nA:", " yes")]
    ll = [req("loglikelihood", c, x) for c, x in pairs]
    text = " ".join(r["text"] for r in read_jsonl(data_dir() / "tinystories_val.jsonl")[:3])
    gen = [req("generate_until", "Once upon a time", {"until": ["."], "max_gen_toks": 12, "do_sample": False})]
    roll = [req("loglikelihood_rolling", text)]
    assert ours.loglikelihood(ll) == [(pytest.approx(x, abs=ATOL), g) for x, g in ref.loglikelihood(ll)]
    assert ours.loglikelihood_rolling(roll) == pytest.approx(ref.loglikelihood_rolling(roll), abs=ATOL)
    assert ours.generate_until(gen) == ref.generate_until(gen)


def test_model_by_config_name_decodes_known_story():
    """model=stories260k (conf/model) through spd.load; greedy decoding gives the documented story."""
    lm = SPDLM(model="stories260k", batch_size=2, device="cpu", progress=False)
    (text,) = lm.generate_until([req("generate_until", "", {"until": ["."], "max_gen_toks": 32})])
    assert text == "Once upon a time, there was a little girl named Lily"


def test_tiny_lm_eval_run(stories260k, tmp_path):
    """stories260K through lm-eval's simple_evaluate on 20 documents of two tasks."""
    model, tok = stories260k
    cfg = EvalConfig(tasks=["spd_tinystories_cloze", "spd_arc_easy"], limit=20, batch_size=8, max_length=512)
    results = evaluate(model, tok, cfg, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert json.loads((tmp_path / "results.json").read_text())["results"] == results["results"]
    assert set(summary["tasks"]["spd_tinystories_cloze"]) == {"acc", "perplexity"}
    assert set(summary["tasks"]["spd_arc_easy"]) == {"acc", "acc_norm"}
    assert summary["n_samples"] == {"spd_tinystories_cloze": 20, "spd_arc_easy": 20}
    for metrics in summary["tasks"].values():
        for m in metrics.values():
            assert math.isfinite(m["value"]) and math.isfinite(m["stderr"])
    # stories260K knows how TinyStories paragraphs end far better than chance (1 in 512 pieces).
    assert summary["tasks"]["spd_tinystories_cloze"]["perplexity"]["value"] < 100


def test_only_the_writer_writes(model, tok, tmp_path):
    cfg = EvalConfig(tasks=["spd_arc_easy"], limit=4, batch_size=4)
    results = evaluate(model, tok, cfg, tmp_path, is_writer=False)
    assert "spd_arc_easy" in results["results"] and not any(tmp_path.iterdir())


def test_cli_runs_a_saved_model(model, tok, tmp_path, monkeypatch):
    """`spd-lm-eval --model spd --model_args pretrained=DIR`: lm-eval's own CLI, our tasks by default."""
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "out"
    model_args = f"pretrained={tmp_path / 'tiny'},max_length={MAX_POSITIONS}"
    argv = ["spd-lm-eval", "--model", "spd", "--model_args", model_args, "--tasks", "spd_piqa", "--limit", "4",
            "--batch_size", "2", "--device", "cpu", "--output_path", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    cli()
    (path,) = out.rglob("results_*.json")
    assert "acc,none" in json.loads(path.read_text())["results"]["spd_piqa"]
