"""Perplexity: lm-eval's own windowing, the one scorer, against direct per-window sums written here."""

import math

import torch
import torch.nn.functional as F
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from spd.perplexity import document_perplexity, preprocess, rolling_windows, score_windows, windows_perplexity
from test_block import tiny

CLOSE = 1e-4  # fp32 NLL sums over a few hundred tokens, batched vs one by one


class CharTok:
    """Characters as ids (a..z and space), BOS = 0."""

    bos_token_id, eos_token_id = 0, 0

    def __call__(self, text, add_special_tokens=False):
        return type("E", (), {"input_ids": [1 + (ord(c) - 97 if c != " " else 26) for c in text]})()


def test_rolling_windows_are_lm_evals():
    ids = list(range(10, 33))
    ours = rolling_windows(ids, 0, 8)
    theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, 0, 8, context_len=1)]
    assert ours == theirs
    assert [t for _, t in ours] == [ids[0:8], ids[8:16], ids[16:23]]  # every token scored once, in order


def direct_nll(model, ids, bos, max_length):
    """Each window by hand: input [BOS] + first tokens, or the max_length tokens before the window's targets."""
    total = 0.0
    for start in range(0, len(ids), max_length):
        tgt = ids[start:start + max_length]
        inp = ([bos] + ids)[max(0, start + len(tgt) - max_length):start + len(tgt)]  # the max_length inputs
        logits = model(torch.tensor([inp])).logits[0]
        total += F.cross_entropy(logits[-len(tgt):], torch.tensor(tgt), reduction="sum").item()
    return total


@torch.no_grad()
def test_document_perplexity_matches_direct_sum():
    model, tok = tiny(), CharTok()
    docs = ["the quick brown fox jumps over the lazy dog " * 3, "hello world", "a b c d e f g h i j k"]
    got = document_perplexity(model, tok, docs, max_length=32, batch_size=2, progress=False)
    nll = sum(direct_nll(model, tok(d).input_ids, 0, 32) for d in docs)
    assert math.isclose(got["nll"], nll, rel_tol=CLOSE)
    assert got["tokens"] == sum(len(d) for d in docs)
    words = sum(len(d.split(" ")) for d in docs)  # lm-eval splits on whitespace, trailing space counts
    assert math.isclose(got["word_perplexity"], math.exp(nll / words), rel_tol=CLOSE)
    assert math.isclose(got["bits_per_byte"], nll / (sum(map(len, docs)) * math.log(2)), rel_tol=CLOSE)
    assert got["cost"]["tokens_per_s"] > 0 and got["cost"]["tflop_per_s"] > 0


@torch.no_grad()
def test_windows_perplexity_scores_every_token_given_bos():
    model = tiny()
    tokens = torch.randint(1, 97, (5, 12), generator=torch.Generator().manual_seed(0))
    bos = model.config.bos_token_id
    inputs = torch.cat([torch.full((5, 1), bos), tokens[:, :-1]], 1)  # (5, 12): [BOS] + all but the last
    nll = F.cross_entropy(model(inputs).logits.reshape(-1, 97), tokens.reshape(-1))
    assert math.isclose(windows_perplexity(model, tokens, batch_size=2), math.exp(nll.item()), rel_tol=CLOSE)


@torch.no_grad()
def test_score_windows_keeps_order_and_pads_right():
    model = tiny()
    top = model(torch.tensor([[2, 7]])).logits[0].argmax(-1).tolist()  # greedy after 2 and after 2, 7
    windows = [([5], [6, 7, 8]), ([1, 2, 3, 4, 5, 6], [9]), ([3, 3], [4, 4]), ([2], [top[0]]), ([2, 7], [top[1], 1])]
    got = score_windows(lambda ids: model(ids).logits, windows, batch_size=2)
    for (ctx, cont), (logp, greedy) in zip(windows, got):
        logits = model(torch.tensor([(ctx + cont)[:-1]])).logits[0, -len(cont):]
        ref = -F.cross_entropy(logits, torch.tensor(cont), reduction="sum").item()
        assert math.isclose(logp, ref, rel_tol=CLOSE)
        assert greedy == bool((logits.argmax(-1) == torch.tensor(cont)).all())
    assert got[3][1]  # a greedy continuation is recognised as one


def test_wikitext_preprocessing_is_lm_evals():
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    page = " = Valkyria = \n Senjō no Valkyria 3 @-@ 1 : it 's a game , isn 't it ? \n"
    assert preprocess(page, "wikitext") == wikitext_detokenizer({"page": page}) != page
    assert preprocess(page, None) == page


@torch.no_grad()
def test_spd_ppl_equals_lm_evals_wikitext(stories260k, tmp_path):
    """The same documents through spd-ppl's path and through lm-eval's spd_wikitext task (its detokenizer,
    word counts and weighted perplexity, our adapter): the same word perplexity."""
    from spd.calibration import read_texts
    from spd.config import EvalConfig
    from spd.evaluate import evaluate

    model, tok = stories260k
    docs = read_texts("wikitext2_test.jsonl", "page")[:2]
    ours = document_perplexity(model, tok, docs, 512, 4, "wikitext", progress=False)
    res = evaluate(model, tok, EvalConfig(tasks=["spd_wikitext"], limit=2, batch_size=4, max_length=512),
                   tmp_path, is_writer=False)["results"]["spd_wikitext"]
    assert math.isclose(ours["word_perplexity"], res["word_perplexity,none"], rel_tol=1e-6)
    assert math.isclose(ours["bits_per_byte"], res["bits_per_byte,none"], rel_tol=1e-6)
