"""Load a llama2.c "legacy" checkpoint and its tokenizer.bin as transformers objects.

Checkpoint: 7 little-endian int32 (dim D, hidden_dim H, n_layers L, n_heads NH, n_kv_heads KV,
vocab_size V, seq_len S; V > 0 means the classifier is tied to the embedding, V < 0 means an untied
wcls[|V|, D] follows at the end), then float32 arrays: tok_emb[V,D], rms_att[L,D], wq[L,D,D],
wk[L,KV*hd,D], wv[L,KV*hd,D], wo[L,D,D], rms_ffn[L,D], w1[L,H,D] (gate), w2[L,D,H] (down),
w3[L,H,D] (up), rms_final[D], freq_cis_real[S*hd/2], freq_cis_imag[S*hd/2], with hd = D/NH.
Matrices are (out, in) like nn.Linear.weight; RMSNorm eps 1e-5, RoPE theta 10000, no biases.

RoPE permutation. llama2.c rotates interleaved pairs of a head's dimensions, (x[2i], x[2i+1]) by
angle p*theta^(-2i/hd); transformers' Llama rotates halves, (x[i], x[i + hd/2]) by the same angle.
Attention only sees q.k, and a permutation applied to the rows of both wq and wk per head leaves q.k
unchanged, so we reorder each head's rows so that row 2i goes to i and row 2i+1 goes to i + hd/2:
    w.view(heads, hd/2, 2, D).transpose(1, 2).reshape(heads*hd, D)
(the permute() of transformers' convert_llama_weights_to_hf.py). Then HF's half-rotation of the
permuted rows is exactly llama2.c's pair rotation of the original ones.

Tokenizer: int32 max_token_length, then per piece float32 score, int32 length, bytes. Pieces 0, 1, 2
are <unk>, BOS, EOS (stored as "\\n<s>\\n", "\\n</s>\\n"), 3..258 the byte-fallback pieces <0x00>..<0xFF>,
then BPE merges (score = -rank) and single characters; spaces are stored as " ", not sentencepiece's
"▁". llama2.c encodes by prepending a space, mapping characters to pieces (UTF-8 bytes where unknown)
and repeatedly merging the adjacent pair whose concatenation is the piece with the highest score
(leftmost on ties). A `tokenizers` BPE whose merges are every split of every piece ranked by the
merged piece's score does the same thing.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, normalizers
from tokenizers.models import BPE
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from spd.errors import ModelLoadError

_HEADER = struct.Struct("<7i")
_HEADER_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
_V1_MAGIC = 0x616B3432  # "ak42": llama2.c's versioned export formats, not the legacy one
_SPECIALS = ("<unk>", "<s>", "</s>")
_N_BYTE_PIECES = 256
_ROPE_THETA = 10000.0
_RMS_EPS = 1e-5


def _read_file(path: str | Path, what: str) -> tuple[Path, bytes]:
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"llama2.c {what} file not found: {path} (expected an existing file)")
    return path, path.read_bytes()


def _check_header(path: Path, h: dict[str, int]) -> None:
    """Reject headers no legacy export can have, before they size any array."""
    if h["dim"] == _V1_MAGIC:
        raise ModelLoadError(
            f"{path} starts with llama2.c's 'ak42' magic: it is a versioned export, not the legacy "
            "format; re-export it with llama2.c's export.py --version 0"
        )
    bad = [f"{k}={v}" for k, v in h.items() if (v == 0 if k == "vocab_size" else v <= 0)]
    if bad:
        raise ModelLoadError(
            f"{path}: impossible llama2.c header ({', '.join(bad)}); all of {', '.join(_HEADER_FIELDS)} "
            "must be positive (vocab_size may be negative for an untied classifier)"
        )
    dim, nh, kv = h["dim"], h["n_heads"], h["n_kv_heads"]
    if dim % nh or (dim // nh) % 2 or nh % kv:
        raise ModelLoadError(
            f"{path}: impossible llama2.c header (dim={dim}, n_heads={nh}, n_kv_heads={kv}); n_heads "
            "must divide dim into an even head_dim and n_kv_heads must divide n_heads"
        )


def _read_checkpoint(path: str | Path) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """Header fields and the float32 arrays, named as in llama2.c, shaped (out, in)."""
    path, data = _read_file(path, "checkpoint")
    if len(data) < _HEADER.size:
        raise ModelLoadError(
            f"{path} is {len(data)} bytes, shorter than the {_HEADER.size}-byte llama2.c header"
        )
    h = dict(zip(_HEADER_FIELDS, _HEADER.unpack_from(data)))
    _check_header(path, h)
    D, H, L, NH, KV, S = (h[k] for k in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "seq_len"))
    V, hd = abs(h["vocab_size"]), D // NH
    shapes = {
        "tok_emb": (V, D), "rms_att": (L, D), "wq": (L, D, D), "wk": (L, KV * hd, D),
        "wv": (L, KV * hd, D), "wo": (L, D, D), "rms_ffn": (L, D), "w1": (L, H, D), "w2": (L, D, H),
        "w3": (L, H, D), "rms_final": (D,), "freq_cis_real": (S, hd // 2), "freq_cis_imag": (S, hd // 2),
    }  # fmt: skip
    if h["vocab_size"] < 0:
        shapes["wcls"] = (V, D)
    expected = _HEADER.size + 4 * sum(math.prod(s) for s in shapes.values())
    if len(data) != expected:
        raise ModelLoadError(
            f"{path} is {len(data)} bytes but its header ({', '.join(f'{k}={v}' for k, v in h.items())}) "
            f"implies {expected} bytes: the file is "
            f"{'truncated' if len(data) < expected else 'longer than a legacy llama2.c checkpoint'}"
        )
    flat = torch.frombuffer(bytearray(data), dtype=torch.float32, offset=_HEADER.size)
    arrays, at = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        arrays[name] = flat[at : at + n].view(shape)
        at += n
    return h, arrays


def _check_rope(path: Path, arrays: dict[str, torch.Tensor], head_dim: int) -> None:
    """HF recomputes RoPE from theta, so make sure the file's tables are the theta-10000 ones."""
    S = arrays["freq_cis_real"].shape[0]
    inv_freq = 1.0 / _ROPE_THETA ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angle = torch.outer(torch.arange(S, dtype=torch.float64), inv_freq)
    err = max(
        (arrays["freq_cis_real"].double() - angle.cos()).abs().max().item(),
        (arrays["freq_cis_imag"].double() - angle.sin()).abs().max().item(),
    )
    if err > 1e-3:  # fp32 tables drift ~1e-5 at position 511; another theta is off by O(1)
        raise ModelLoadError(
            f"{path}: the stored freq_cis tables differ from RoPE with theta {_ROPE_THETA:g} by up to "
            f"{err:.3g}; only theta-{_ROPE_THETA:g} checkpoints are supported"
        )


def _permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved-pair rows to rotate-half rows, per head (see the module docstring)."""
    out, dim = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, dim).transpose(1, 2).reshape(out, dim)


def read_llama2c_tokenizer(path: str | Path, vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """A fast tokenizer equivalent to llama2.c's encode/decode, adding BOS like Llama's.

    vocab_size: how many pieces to read (llama2.c takes it from the checkpoint); None reads to the
    end of the file.
    """
    path, data = _read_file(path, "tokenizer")
    pieces: list[str] = []
    scores: list[float] = []
    at = 4
    try:
        (max_len,) = struct.unpack_from("<i", data, 0)
        while (len(pieces) < vocab_size) if vocab_size is not None else at < len(data):
            score, n = struct.unpack_from("<fi", data, at)
            if not 0 < n <= max_len or at + 8 + n > len(data):
                raise struct.error(f"piece {len(pieces)} claims {n} bytes (max_token_length {max_len})")
            pieces.append(data[at + 8 : at + 8 + n].decode("utf-8"))
            scores.append(score)
            at += 8 + n
    except (struct.error, UnicodeDecodeError) as e:
        want = f"{vocab_size} pieces" if vocab_size is not None else "whole pieces up to its end"
        raise ModelLoadError(
            f"{path} ({len(data)} bytes) is not a valid llama2.c tokenizer.bin: it holds {len(pieces)} "
            f"readable pieces, then {e}; expected {want}, each float32 score, int32 length, UTF-8 bytes"
        ) from None
    if vocab_size is not None and at != len(data):
        raise ModelLoadError(
            f"{path} has {len(data) - at} bytes left after the {vocab_size} pieces the checkpoint's "
            "vocab_size asks for: the tokenizer does not belong to this checkpoint"
        )
    if len(pieces) < 3 + _N_BYTE_PIECES or [p.strip() for p in pieces[:3]] != list(_SPECIALS):
        raise ModelLoadError(
            f"{path}: expected pieces 0..2 to be {', '.join(_SPECIALS)} followed by 256 byte pieces, "
            f"got {len(pieces)} pieces starting {pieces[:3]!r}"
        )
    # Specials lose llama2.c's newline padding; spaces become sentencepiece's "▁", which is what the
    # Llama normalizer below produces from the input text.
    pieces = list(_SPECIALS) + [p.replace(" ", "▁") for p in pieces[3:]]
    vocab = {p: i for i, p in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise ModelLoadError(f"{path}: pieces are not unique, so ids would be ambiguous")

    # Every way to form a piece from two pieces, most valuable merged piece first: BPE then always
    # applies the available merge with the highest score, as llama2.c's loop does. The tie-breaks
    # (longer left part first) follow transformers' generate_merges.
    merges = [
        (p[:k], p[k:], scores[i])
        for i, p in enumerate(pieces)
        if i >= len(_SPECIALS)
        for k in range(1, len(p))
        if p[:k] in vocab and p[k:] in vocab
    ]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    bpe = BPE(
        vocab=vocab,
        merges=[(a, b) for a, b, _ in merges],
        unk_token="<unk>",
        fuse_unk=True,
        byte_fallback=True,  # characters with no piece become <0xXX> pieces, as in llama2.c
    )
    tk = Tokenizer(bpe)
    # Llama's (legacy) sentencepiece emulation: llama2.c's leading space, spaces as "▁" ...
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # ... and back: "▁" to space, <0xXX> runs to UTF-8 text, drop the prepended space.
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in _SPECIALS])
    # add_bos_token=True makes transformers install the "<s> $A" TemplateProcessing post-processor.
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,  # decoding must give back the exact text
    )


def _config(h: dict[str, int]) -> LlamaConfig:
    D, NH = h["dim"], h["n_heads"]
    return LlamaConfig(
        vocab_size=abs(h["vocab_size"]),
        hidden_size=D,
        intermediate_size=h["hidden_dim"],
        num_hidden_layers=h["n_layers"],
        num_attention_heads=NH,
        num_key_value_heads=h["n_kv_heads"],
        head_dim=D // NH,
        max_position_embeddings=h["seq_len"],
        rms_norm_eps=_RMS_EPS,
        # transformers 5 keeps RoPE settings here; rope_theta as a top-level kwarg is legacy.
        rope_parameters={"rope_type": "default", "rope_theta": _ROPE_THETA},
        tie_word_embeddings=h["vocab_size"] > 0,
        bos_token_id=1,
        eos_token_id=2,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )


def read_llama2c_config(checkpoint: str | Path) -> LlamaConfig:
    """The LlamaConfig of a llama2.c checkpoint (the whole file is read and size-checked)."""
    return _config(_read_checkpoint(checkpoint)[0])


def load_llama2c(
    checkpoint: str | Path, tokenizer: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """The checkpoint as an eval-mode LlamaForCausalLM in dtype, and its tokenizer."""
    h, a = _read_checkpoint(checkpoint)
    D, NH, KV, L = h["dim"], h["n_heads"], h["n_kv_heads"], h["n_layers"]
    V, tied = abs(h["vocab_size"]), h["vocab_size"] > 0
    _check_rope(Path(checkpoint), a, D // NH)
    tok = read_llama2c_tokenizer(tokenizer, vocab_size=V)
    tok.model_max_length = h["seq_len"]

    config = _config(h)
    sd = {
        "model.embed_tokens.weight": a["tok_emb"],
        "model.norm.weight": a["rms_final"],
        "lm_head.weight": a["tok_emb"] if tied else a["wcls"],
    }
    for i in range(L):
        p = f"model.layers.{i}."
        sd |= {
            p + "input_layernorm.weight": a["rms_att"][i],
            p + "self_attn.q_proj.weight": _permute_rope(a["wq"][i], NH),
            p + "self_attn.k_proj.weight": _permute_rope(a["wk"][i], KV),
            p + "self_attn.v_proj.weight": a["wv"][i],
            p + "self_attn.o_proj.weight": a["wo"][i],
            p + "post_attention_layernorm.weight": a["rms_ffn"][i],
            p + "mlp.gate_proj.weight": a["w1"][i],
            p + "mlp.up_proj.weight": a["w3"][i],
            p + "mlp.down_proj.weight": a["w2"][i],
        }
    model = LlamaForCausalLM(config)
    model.load_state_dict(sd, strict=True)
    return model.to(dtype).eval(), tok
