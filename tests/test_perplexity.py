"""Rolling perplexity against direct computation."""

import math

import torch
import torch.nn.functional as F

from spd.perplexity import document_perplexity, rolling_windows, windows_perplexity
from test_block import tiny

CLOSE = 1e-4  # fp32 NLL sums over a few hundred tokens, batched vs one by one


class CharTok:
    """Characters as ids (a..z and space), BOS = 0."""

    bos_token_id, eos_token_id = 0, 0

    def __call__(self, text, add_special_tokens=False):
        return type("E", (), {"input_ids": [1 + (ord(c) - 97 if c != " " else 26) for c in text]})()


def test_rolling_windows_score_every_token_once():
    ids = list(range(10, 33))
    wins = rolling_windows(ids, bos=0, max_length=8)
    assert [t for _, t in wins] == [ids[0:8], ids[8:16], ids[16:23]]
    assert wins[0][0] == [0] + ids[:7] and wins[1][0] == ids[7:15]


def direct_nll(model, ids, bos, max_length):
    total = 0.0
    for inp, tgt in rolling_windows(ids, bos, max_length):
        logits = model(torch.tensor([inp])).logits[0]
        total += F.cross_entropy(logits[: len(tgt)], torch.tensor(tgt), reduction="sum").item()
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


@torch.no_grad()
def test_windows_perplexity():
    model = tiny()
    tokens = torch.randint(0, 97, (5, 12), generator=torch.Generator().manual_seed(0))
    logits = model(tokens).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, 97), tokens[:, 1:].reshape(-1))
    assert math.isclose(windows_perplexity(model, tokens, batch_size=2), math.exp(nll.item()), rel_tol=CLOSE)
