"""spd.llama2c against llama2.c's own algorithms, re-implemented here from the raw .bin files."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch

from spd.errors import ModelLoadError
from spd.llama2c import load_llama2c, read_llama2c_tokenizer

STORY_START = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big, red ball."
)
TEXTS = [
    "",
    "hello",
    " leading space",
    "two  spaces and trailing ",
    "Hello, world! (It's 2024: 3.14 + 42 = 45.14?)",
    "line one\nline two\n\n\ttabbed",
    "café naïve — “quotes” 日本語 ☃ 😀 €5",
    STORY_START,
]


@pytest.fixture(scope="module")
def paths(assets_dir):
    d = assets_dir / "models" / "stories260K"
    return d / "stories260K.bin", d / "tok512.bin"


@pytest.fixture(scope="module")
def stories(assets_dir):
    """A few TinyStories validation paragraphs: realistic text for the tokenizer comparison."""
    with open(assets_dir / "data" / "tinystories_val.jsonl") as f:
        return [json.loads(next(f))["text"] for _ in range(8)]


# --- llama2.c reference implementations ------------------------------------------------------


def read_tokenizer_bin(path):
    data = path.read_bytes()
    pieces, scores, at = [], [], 4
    while at < len(data):
        score, n = struct.unpack_from("<fi", data, at)
        pieces.append(data[at + 8 : at + 8 + n])
        scores.append(score)
        at += 8 + n
    return pieces, scores


def llama2c_encode(text: str, pieces: list[bytes], scores: list[float]) -> list[int]:
    """run.c's encode(bos=1, eos=0), on the file's raw byte strings."""
    lookup = {p: i for i, p in enumerate(pieces)}
    tokens = [1]
    if text:
        tokens.append(lookup[b" "])  # the dummy prefix
    for ch in text:
        b = ch.encode("utf-8")
        tokens += [lookup[b]] if b in lookup else [x + 3 for x in b]
    while True:
        best_score, best_id, best_i = -1e10, -1, -1
        for i in range(len(tokens) - 1):
            j = lookup.get(pieces[tokens[i]] + pieces[tokens[i + 1]], -1)
            if j != -1 and scores[j] > best_score:
                best_score, best_id, best_i = scores[j], j, i
        if best_i == -1:
            return tokens
        tokens[best_i : best_i + 2] = [best_id]


def read_checkpoint_bin(path):
    raw = path.read_bytes()
    D, H, L, NH, KV, V, S = struct.unpack_from("<7i", raw)
    hd = D // NH
    flat = torch.frombuffer(bytearray(raw[28:]), dtype=torch.float32)
    at = 0

    def take(*shape):
        nonlocal at
        n = math.prod(shape)
        at += n
        return flat[at - n : at].view(shape)

    w = dict(dim=D, n_heads=NH, n_kv_heads=KV, tied=V > 0)
    w["tok_emb"], w["rms_att"] = take(abs(V), D), take(L, D)
    w["wq"], w["wk"] = take(L, D, D), take(L, KV * hd, D)
    w["wv"], w["wo"] = take(L, KV * hd, D), take(L, D, D)
    w["rms_ffn"], w["w1"], w["w2"], w["w3"] = take(L, D), take(L, H, D), take(L, D, H), take(L, H, D)
    w["rms_final"], w["cos"], w["sin"] = take(D), take(S, hd // 2), take(S, hd // 2)
    w["wcls"] = w["tok_emb"] if V > 0 else take(abs(V), D)
    assert at == flat.numel()
    return w


def reference_logits(w, ids: list[int]) -> torch.Tensor:
    """run.c's forward for a whole sequence: interleaved RoPE from the file's freq_cis tables."""
    D, NH, KV = w["dim"], w["n_heads"], w["n_kv_heads"]
    hd, T = D // NH, len(ids)
    cos, sin = w["cos"][:T, None, :], w["sin"][:T, None, :]

    def rms(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * g

    def rope(v):  # (T, heads, hd): rotate pairs (2i, 2i+1)
        a, b = v[..., 0::2], v[..., 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)

    x = w["tok_emb"][torch.tensor(ids)]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for layer in range(w["wq"].shape[0]):
        h = rms(x, w["rms_att"][layer])
        q = rope((h @ w["wq"][layer].T).view(T, NH, hd))
        k = rope((h @ w["wk"][layer].T).view(T, KV, hd)).repeat_interleave(NH // KV, dim=1)
        v = (h @ w["wv"][layer].T).view(T, KV, hd).repeat_interleave(NH // KV, dim=1)
        att = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + torch.einsum("hts,shd->thd", att, v).reshape(T, D) @ w["wo"][layer].T
        h = rms(x, w["rms_ffn"][layer])
        x = x + (torch.nn.functional.silu(h @ w["w1"][layer].T) * (h @ w["w3"][layer].T)) @ w["w2"][layer].T
    return rms(x, w["rms_final"]) @ w["wcls"].T


# --- tests -------------------------------------------------------------------------------------


def test_greedy_story_from_bos(stories260k):
    model, tok = stories260k
    out = model.generate(torch.tensor([[1]]), max_new_tokens=48, do_sample=False)
    text = tok.decode(out[0], skip_special_tokens=True)
    assert text.startswith(STORY_START), text


def test_config(stories260k):
    model, tok = stories260k
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (64, 172, 5)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (8, 4, 8)
    assert (c.vocab_size, c.max_position_embeddings, c.bos_token_id, c.eos_token_id) == (512, 512, 1, 2)
    assert c.rope_parameters["rope_theta"] == 10000.0 and c.rms_norm_eps == 1e-5
    assert c.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert len(tok) == 512 and tok.model_max_length == 512
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trip(stories260k, text):
    tok = stories260k[1]
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id == 1
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_matches_llama2c_encode(stories260k, paths, stories):
    tok = stories260k[1]
    pieces, scores = read_tokenizer_bin(paths[1])
    for text in TEXTS + stories:
        assert tok(text)["input_ids"] == llama2c_encode(text, pieces, scores), text


def test_special_tokens_in_text(stories260k):
    """Like transformers' Llama tokenizers (and unlike llama2.c), "<s>" in text is the BOS token."""
    tok = stories260k[1]
    assert tok("<s>a")["input_ids"] == [1, 1, 261]


def test_byte_fallback(stories260k):
    tok = stories260k[1]
    ids = tok("\n")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "▁", "<0x0A>"]


def test_logits_match_reference_forward(stories260k, paths, stories):
    model, tok = stories260k
    ids = tok(stories[2])["input_ids"][:200]
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0]
    want = reference_logits(read_checkpoint_bin(paths[0]), ids)
    assert (got - want).abs().max().item() <= 1e-4


def test_untied_classifier(paths, tmp_path):
    """A negative vocab_size means a separate wcls at the end; build one from the tied checkpoint."""
    raw = bytearray(paths[0].read_bytes())
    header = list(struct.unpack_from("<7i", raw))
    header[5] = -header[5]
    struct.pack_into("<7i", raw, 0, *header)
    tok_emb = torch.frombuffer(bytearray(raw[28 : 28 + 4 * 512 * 64]), dtype=torch.float32).view(512, 64)
    raw += (tok_emb.flip(0) * 0.5).contiguous().numpy().tobytes()
    ckpt = tmp_path / "untied.bin"
    ckpt.write_bytes(raw)
    model, tok = load_llama2c(ckpt, paths[1])
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    ids = tok("The cat sat on the mat.")["input_ids"]
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0]
    assert (got - reference_logits(read_checkpoint_bin(ckpt), ids)).abs().max().item() <= 1e-4


def test_dtype(paths):
    model, _ = load_llama2c(*paths, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# --- errors ------------------------------------------------------------------------------------


def test_missing_files(paths, tmp_path):
    with pytest.raises(ModelLoadError, match="checkpoint file not found"):
        load_llama2c(tmp_path / "nope.bin", paths[1])
    with pytest.raises(ModelLoadError, match="tokenizer file not found"):
        load_llama2c(paths[0], tmp_path / "nope.bin")


def test_truncated_checkpoint(paths, tmp_path):
    raw = paths[0].read_bytes()
    short = tmp_path / "short.bin"
    short.write_bytes(raw[:100_000])
    truncated = rf"100000 bytes .* implies {len(raw)} bytes: the file is truncated"
    with pytest.raises(ModelLoadError, match=truncated):
        load_llama2c(short, paths[1])
    short.write_bytes(raw[:10])
    with pytest.raises(ModelLoadError, match="shorter than the 28-byte llama2.c header"):
        load_llama2c(short, paths[1])


def test_truncated_tokenizer(paths, tmp_path):
    short = tmp_path / "tok.bin"
    short.write_bytes(paths[1].read_bytes()[:3000])
    with pytest.raises(ModelLoadError, match="not a valid llama2.c tokenizer.bin"):
        read_llama2c_tokenizer(short)
    with pytest.raises(ModelLoadError, match="expected 512 pieces"):
        load_llama2c(paths[0], short)


@pytest.mark.parametrize(
    ("header", "match"),
    [
        ((-1,) * 7, "impossible llama2.c header .*must be positive"),
        ((64, 172, 0, 8, 4, 512, 512), "n_layers=0"),
        ((64, 172, 5, 7, 7, 512, 512), "n_heads must divide dim"),
        ((64, 172, 5, 8, 3, 512, 512), "n_kv_heads must divide n_heads"),
        ((64, 172, 5, 64, 64, 512, 512), "even head_dim"),
        ((0x616B3432, 1, 0, 0, 0, 0, 0), "not the legacy format"),
        ((1 << 20, 1 << 20, 1 << 10, 8, 8, 512, 512), "implies .* bytes: the file is truncated"),
    ],
)
def test_bad_header(paths, tmp_path, header, match):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(struct.pack("<7i", *header) + paths[0].read_bytes()[28:])
    with pytest.raises(ModelLoadError, match=match):
        load_llama2c(bad, paths[1])


def test_wrong_rope_tables(paths, tmp_path):
    raw = bytearray(paths[0].read_bytes())
    n = 512 * 4  # S * hd/2 floats per table; the tables end the tied checkpoint
    raw[len(raw) - 8 * n :] = torch.zeros(2 * n).numpy().tobytes()
    bad = tmp_path / "rope.bin"
    bad.write_bytes(raw)
    with pytest.raises(ModelLoadError, match="freq_cis"):
        load_llama2c(bad, paths[1])
