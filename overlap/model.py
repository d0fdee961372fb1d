"""A plain LLaMA for fast inference (gpt-fast style), with every sync point an explicit named call.

Per block, on every rank (x is the block input, identical on all ranks; attn and mlp see only this
rank's heads and FFN rows once overlap.tp.shard_ has sliced them; unsharded, the syncs are identities):

    a   = attn(attn_norm(x))                                   # (B, S, D) this rank's partial
    baseline:  h = x + attn_sync(a);  out = h + mlp_sync(mlp(mlp_norm(h)))
    SPD:       out = x + block_sync(a + mlp(mlp_norm(x + a)))  # the only sync of an SPD block

Where a sync does not sum across ranks (one rank, nocomm: what spd-bench's virtual_tp times), the residual rides
in the epilogue of the GEMM before it (wo's, w2's: cuBLAS's addmm, or the Triton GEMVs' for decode rows):
    baseline:  h = wo(heads) + x;  out = w2(act(mlp_norm(h))) + h;   SPD:  out = w2(act(mlp_norm(x + a))) + (x + a)
Where it sums, x and h are added after it, so the all-reduce's bf16 hops never carry them (Block.synced); SPD's
rank-local a still rides in w2's epilogue.

A forward calls 2L - (#SPD blocks) all-reduces (Sync.start: the same, asynchronous, for overlap.iso).
With a collective implementation other than nccl bound (overlap.tp.set_impl_, Runtime(impl=...)) the
row-parallel output GEMMs move into the sync points (Sync.matmul -> impl.matmul_all_reduce):
    baseline:  h = attn_sync.matmul(heads, wo, residual=x);  out = mlp_sync.matmul(act(h), w2, residual=h)
    SPD:       a = wo(heads);  out = block_sync.matmul(act(x + a), w2, add=a, residual=x)
attn is RoPE (rotating halves, as transformers' Llama; Llama-3 and linear rope scaling) + grouped-query
SDPA against a static KV cache preallocated for max_batch x max_seq; mlp is SwiGLU. q/k/v and gate/up
are fused into one weight each (one GEMM). Decode shapes are static: CUDA graphs or compile capture it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import CausalBias, causal_lower_right

from overlap.attention import attend
from overlap.decode_attention import supports
from overlap.ops import EAGER_OPS, decode_mask
from overlap.sync import Sync
from spd.errors import ModelLoadError

NORM_LINEAR_MAX_ROWS = 16  # decode rows (batch x tokens) up to which ops.norm_linear runs (one tl.dot tile)
INIT_STD = 0.02  # random weights: LLaMA's initializer_range, keeps 80 random bf16 blocks finite


@dataclass(frozen=True)
class ModelArgs:
    """The global (unsharded) architecture."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: int = 0  # 0: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(default=None, hash=False)  # transformers' rope_parameters (llama3, linear)
    tie_embeddings: bool = False

    def __post_init__(self):
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)

    @classmethod
    def from_hf_config(cls, config) -> "ModelArgs":
        params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        scaling = params if params.get("rope_type", params.get("type", "default")) != "default" else None
        return cls(
            vocab_size=config.vocab_size, dim=config.hidden_size, n_layers=config.num_hidden_layers,
            n_heads=config.num_attention_heads, n_kv_heads=config.num_key_value_heads or config.num_attention_heads,
            ffn_dim=config.intermediate_size, head_dim=getattr(config, "head_dim", None) or 0,
            norm_eps=config.rms_norm_eps, rope_theta=float(theta), rope_scaling=scaling,
            tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )

    @classmethod
    def from_model_config(cls, cfg) -> "ModelArgs":
        """From spd.config.ModelConfig (or a dict with its field names) of a random-weight model."""
        get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
        need = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "vocab_size")
        if missing := [k for k in need if get(k) is None]:
            raise ModelLoadError(f"model {get('name')!r} lacks {', '.join(missing)}; a random-weight model "
                                 f"needs its shape in conf/model/<name>.yaml")
        return cls(
            vocab_size=get("vocab_size"), dim=get("hidden_size"), n_layers=get("num_layers"),
            n_heads=get("num_heads"), n_kv_heads=get("num_kv_heads") or get("num_heads"),
            ffn_dim=get("intermediate_size"), norm_eps=get("rms_norm_eps") or 1e-5,
            rope_theta=get("rope_theta") or 10000.0, tie_embeddings=bool(get("tie_word_embeddings")),
        )


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """(Dh/2,) float32 inverse frequencies, as transformers computes them (default, linear, llama3)."""
    dim = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = args.rope_scaling or {}
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / s["factor"]
    if kind != "llama3":
        raise ModelLoadError(f"rope_type {kind!r} is not supported; supported: default, linear, llama3")
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    out = torch.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
    return torch.where(medium, (1 - smooth) * out / factor + smooth * out, out)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.ops = EAGER_OPS  # Transformer.set_fused_

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel on CUDA (fp32 statistics, like transformers' LlamaRMSNorm, one rounding fewer).
        return self.ops.norm(x, self.weight, self.eps)


class KVCache(nn.Module):
    """Static K/V for max_batch x max_seq positions: (Bmax, Hkv, Lmax, Dh) each, written in place."""

    def __init__(self, max_batch: int, n_kv_heads: int, max_seq: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (max_batch, n_kv_heads, max_seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int):
        """Write k, v (B, Hkv, S, Dh) at input_pos (S,); return the first kv_len positions (B, Hkv, L, Dh)."""
        B = k.shape[0]
        kc, vc = self.k[:B], self.v[:B]
        kc.index_copy_(2, input_pos, k)
        vc.index_copy_(2, input_pos, v)
        return kc[:, :, :kv_len], vc[:, :, :kv_len]


class Attention(nn.Module):
    """Fused-qkv grouped-query attention; wo is row-parallel once sharded, so its output is a partial."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wqkv = nn.Linear(args.dim, (args.n_heads + 2 * args.n_kv_heads) * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.kv_cache: KVCache | None = None
        self.ops = EAGER_OPS  # Transformer.set_fused_

    def forward(self, x, cos, sin, input_pos, mask, kv_len):
        heads = self.heads(x, cos, sin, input_pos, mask, kv_len)  # (B, S, H/R Dh)
        return linear(self.ops, heads, self.wo, down=True)  # (B, S, D), this rank's partial

    def heads(self, x, cos, sin, input_pos, mask, kv_len, norm: RMSNorm | None = None):
        """Attention up to (not including) wo: (B, S, H/R Dh), this rank's heads. With norm, x is the block
        input and norm + wqkv run as one kernel (ops.norm_linear); else x is already normalised."""
        B, S, _ = x.shape
        H, KV, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        decode = S == 1 and mask is not None and not isinstance(mask, CausalBias)  # an additive (1, L) mask
        if norm is None:
            qkv = linear(self.ops, x, self.wqkv)  # (B, S, (H/R + 2 KV/R) Dh)
        else:
            qkv = norm_linear(self.ops, x, self.wqkv.weight, norm)
        if decode and self.ops.decode_heads is not None and supports(qkv, Dh):  # one Triton pass (fused ops)
            cache = self.kv_cache
            return self.ops.decode_heads(qkv, cos, sin, input_pos, cache.k[:B], cache.v[:B], H, KV)  # (B, 1, H/R Dh)
        qk = self.ops.rope(qkv[..., : (H + KV) * Dh].view(B, S, H + KV, Dh), cos, sin)  # (B, S, H/R + KV/R, Dh)
        q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)  # (B, H/R, S, Dh), (B, KV/R, S, Dh)
        v = qkv[..., (H + KV) * Dh :].view(B, S, KV, Dh).transpose(1, 2)  # (B, KV/R, S, Dh)
        k, v = self.kv_cache.update(input_pos, k, v, kv_len)  # (B, KV/R, L, Dh)
        if decode:
            y = self.ops.decode_attention(q, k, v, mask)  # (B, H/R, 1, Dh)
        else:
            y = attend(q, k, v, mask)  # (B, H/R, S, Dh)
        return y.transpose(1, 2).reshape(B, S, H * Dh)  # (B, S, H/R Dh)


class MLP(nn.Module):
    """SwiGLU with gate and up fused: w13 rows are [gate; up] (this rank's FFN rows of each)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.ffn_dim = args.ffn_dim
        self.w13 = nn.Linear(args.dim, 2 * args.ffn_dim, bias=False)
        self.w2 = nn.Linear(args.ffn_dim, args.dim, bias=False)
        self.ops = EAGER_OPS  # Transformer.set_fused_

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.ops, self.act(x), self.w2, down=True)  # (B, S, D), this rank's partial

    def act(self, x: torch.Tensor, norm: RMSNorm | None = None) -> torch.Tensor:
        """The MLP up to (not including) w2: (B, S, F/R). With norm, x is not normalised yet and norm + w13 +
        SwiGLU run as one kernel (ops.norm_linear)."""
        if norm is not None:
            return norm_linear(self.ops, x, self.w13.weight, norm, gated=True)  # (B, S, F/R)
        rows = x.numel() // x.shape[-1]
        if self.ops.swiglu_gemv is not None and rows <= NORM_LINEAR_MAX_ROWS:  # SwiGLU in w13's GEMV epilogue
            y = self.ops.swiglu_gemv(x.reshape(rows, x.shape[-1]), self.w13.weight)  # (rows, F/R)
            return y.view(*x.shape[:-1], y.shape[-1])
        return self.ops.swiglu(linear(self.ops, x, self.w13), self.ffn_dim)  # (B, S, F/R)


def linear(ops, x: torch.Tensor, lin: nn.Linear, down: bool = False,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """lin(x) (+ residual, (B, S, N), for wo and w2 only) for x (B, S, K); decode rows (B x S <=
    NORM_LINEAR_MAX_ROWS) through ops.gemv when set (down: wo and w2, through ops.gemv_down, which adds the
    residual in its epilogue); other rows through cuBLAS, the residual added in its epilogue (addmm)."""
    rows = x.numel() // x.shape[-1]
    gemv = ops.gemv_down if down else ops.gemv
    if gemv is None or rows > NORM_LINEAR_MAX_ROWS:
        if residual is None:
            return lin(x)
        return torch.addmm(residual.reshape(rows, -1), x.reshape(rows, -1), lin.weight.t()).view(residual.shape)
    x2 = x.reshape(rows, x.shape[-1])
    if residual is None:
        y = gemv(x2, lin.weight)  # (rows, N)
    else:
        y = gemv(x2, lin.weight, residual=residual.reshape(rows, -1))  # ops.gemv_down
    return y.view(*x.shape[:-1], y.shape[-1])


def norm_linear(ops, x: torch.Tensor, w: torch.Tensor, norm: RMSNorm, gated: bool = False) -> torch.Tensor:
    """act(norm(x) @ w.T) for x (B, S, K) through ops.norm_linear: (B, S, N), or (B, S, N/2) when gated."""
    y = ops.norm_linear(x.reshape(-1, x.shape[-1]), w, norm.weight, norm.eps, gated)
    return y.view(*x.shape[:-1], y.shape[-1])


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = Attention(args)
        self.mlp_norm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)
        self.attn_sync, self.mlp_sync, self.block_sync = Sync("attn"), Sync("mlp"), Sync("block")
        self.spd = False  # set by overlap.tp.set_plan_
        self.ops = EAGER_OPS  # Transformer.set_fused_

    def add_norm(self, x: torch.Tensor, a: torch.Tensor):
        """(x + a, mlp_norm(x + a)): the residual add before the MLP and its norm (one kernel when fused)."""
        return self.ops.add_norm(x, a, self.mlp_norm.weight, self.mlp_norm.eps)

    def forward(self, x, cos, sin, input_pos, mask, kv_len):
        if self.attn_sync.impl is not None:  # overlap.kernels' fused GEMM + all-reduce (impl != nccl)
            return self.forward_fused(x, cos, sin, input_pos, mask, kv_len)
        if self.ops.norm_linear is not None and x.shape[0] * x.shape[1] <= self.ops.norm_linear_rows:  # decode rows
            return self.forward_norm_linear(x, cos, sin, input_pos, mask, kv_len)
        ops, wo, w2 = self.ops, self.attn.wo, self.mlp.w2
        heads = self.attn.heads(self.attn_norm(x), cos, sin, input_pos, mask, kv_len)  # (B, S, H/R Dh)
        if self.spd:
            a = linear(ops, heads, wo, down=True)  # (B, S, D) partial
            h, n = self.add_norm(x, a)  # rank-local x + a_r
            return self.spd_out(x, a, h, self.mlp.act(n))  # the only sync
        if self.attn_sync.sums:  # sync 1, then the residual add and the norm in one kernel
            h, n = self.add_norm(x, self.attn_sync(linear(ops, heads, wo, down=True)))
        else:
            h = self.attn_sync(linear(ops, heads, wo, down=True, residual=x))
            n = self.mlp_norm(h)
        return self.synced(self.mlp_sync, lambda r: linear(ops, self.mlp.act(n), w2, down=True, residual=r), h)

    def synced(self, sync: Sync, gemm, residual: torch.Tensor) -> torch.Tensor:
        """residual + sync(partial), the partial gemm(None): where the sync sums across ranks the residual is
        added after it (one rounding, as in Megatron or vLLM), else it rides in the GEMM's epilogue: gemm(residual)."""
        if sync.sums:
            return self.ops.add(residual, sync(gemm(None)))
        return sync(gemm(residual))

    def spd_out(self, x: torch.Tensor, a: torch.Tensor, h: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """An SPD block's output x + block_sync(a + w2(act)), h = x + a: a (rank-local) rides in w2's epilogue,
        and x with it (as h) where the sync does not sum."""
        return self.synced(self.block_sync, lambda r: linear(self.ops, act, self.mlp.w2, down=True,
                                                             residual=a if r is None else h), x)

    def forward_norm_linear(self, x, cos, sin, input_pos, mask, kv_len):
        """forward's arithmetic with each norm fused into the GEMV after it (ops.norm_linear): attn_norm +
        wqkv, and mlp_norm + w13 + SwiGLU, one kernel each."""
        ops, wo, w2 = self.ops, self.attn.wo, self.mlp.w2
        heads = self.attn.heads(x, cos, sin, input_pos, mask, kv_len, norm=self.attn_norm)
        if self.spd:  # the only sync
            a = linear(ops, heads, wo, down=True)  # partial
            h = ops.add(x, a)  # rank-local
            return self.spd_out(x, a, h, self.mlp.act(h, norm=self.mlp_norm))
        h = self.synced(self.attn_sync, lambda r: linear(ops, heads, wo, down=True, residual=r), x)  # sync 1
        return self.synced(self.mlp_sync, lambda r: linear(ops, self.mlp.act(h, norm=self.mlp_norm), w2, down=True,
                                                           residual=r), h)  # sync 2

    def forward_fused(self, x, cos, sin, input_pos, mask, kv_len):
        """forward's arithmetic with wo / w2 and their sync fused: impl.matmul_all_reduce (docs/kernels.md)."""
        heads = self.attn.heads(self.attn_norm(x), cos, sin, input_pos, mask, kv_len)  # (B, S, H/R Dh)
        if self.spd:
            a = self.attn.wo(heads)  # (B, S, D) rank-local partial a_r, no sync
            g = self.mlp.act(self.add_norm(x, a)[1])  # (B, S, F/R)
            return self.block_sync.matmul(g, self.mlp.w2.weight, add=a, residual=x)  # the only sync
        h = self.attn_sync.matmul(heads, self.attn.wo.weight, residual=x)  # sync 1
        return self.mlp_sync.matmul(self.mlp.act(self.mlp_norm(h)), self.mlp.w2.weight, residual=h)  # sync 2


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        # Uninitialised on purpose (from_hf, from_args and overlap.tp.build_sharded set every weight); an
        # initialising nn.Embedding on the meta device costs a torch._dynamo import (seconds per rank).
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, _weight=torch.empty(args.vocab_size, args.dim))
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_batch = self.max_seq = 0
        self.tp, self.rank = 1, 0  # set by overlap.tp.shard_

    @property
    def fused(self) -> bool:
        return self.layers[0].ops is not EAGER_OPS if len(self.layers) else False

    def set_fused_(self, on: bool = True, decode_kernel: bool = True, norm_gemv: bool = False,
                   triton_gemv: bool = False, swiglu_gemv: bool = False, pdl: bool = False,
                   stream_gemv: bool = False) -> "Transformer":
        """Run RoPE, residual add + RMSNorm and SwiGLU as torch.compile'd kernels (fused_ops) or eagerly;
        decode_kernel=False keeps fused_ops' compiled decode attention instead of the one-pass Triton kernel;
        norm_gemv=True (with on) runs decode rows' norm + wqkv and norm + w13 + SwiGLU as one Triton kernel
        each (overlap.kernels.norm_gemv); triton_gemv=True (with on) runs decode rows' wqkv and w13 GEMVs through
        that kernel without its norm instead of cuBLAS (the norm and SwiGLU stay compiled kernels); swiglu_gemv=True
        (with on) runs decode rows' w13 GEMV through that kernel with SwiGLU in its epilogue; pdl=True (with on and
        triton_gemv) launches every kernel of a decode step but the embedding's and lm_head's with programmatic
        dependent launch (norm_gemv's kernels too), wo and w2 through the Triton GEMV too (gemv_down_op);
        stream_gemv=True (with pdl) runs batch-1 decode's four GEMVs through overlap.kernels.stream_gemv, which copies
        its first weight tiles into shared memory before the PDL wait, attn_norm folded into wqkv's and mlp_norm and
        SwiGLU into w13's (other row counts: as without it)."""
        from overlap.fused_ops import fused_ops  # torch.compile and Triton only when asked for

        if pdl and not (on and triton_gemv):
            raise ValueError("pdl=True needs the fused kernels with triton_gemv=True (cuBLAS's GEMVs do not take part "
                             "in programmatic dependent launch); got "
                             f"on={on}, triton_gemv={triton_gemv}")
        ops = fused_ops(pdl) if on else EAGER_OPS
        if on and not decode_kernel:
            ops = dataclasses.replace(ops, decode_heads=None)
        with_pdl = functools.partial(functools.partial, pdl=True) if pdl else (lambda f: f)
        if on and norm_gemv:
            from overlap.kernels.norm_gemv import norm_linear_op

            ops = dataclasses.replace(ops, norm_linear=with_pdl(norm_linear_op))
        if stream_gemv and not pdl:
            raise ValueError("stream_gemv=True needs pdl=True (its point is the weight copies before the PDL wait)")
        if on and (triton_gemv or swiglu_gemv):
            from overlap.kernels.norm_gemv import gemv_down_op, gemv_op, swiglu_gemv_op

            if triton_gemv:
                ops = dataclasses.replace(ops, gemv=with_pdl(gemv_op))
            if swiglu_gemv:
                ops = dataclasses.replace(ops, swiglu_gemv=with_pdl(swiglu_gemv_op))
            if pdl:
                ops = dataclasses.replace(ops, gemv_down=with_pdl(gemv_down_op))
            if stream_gemv:
                from overlap.kernels.stream_gemv import streamed, streamed_norm_linear

                ops = dataclasses.replace(ops, gemv=streamed(ops.gemv), gemv_down=streamed(ops.gemv_down))
                from overlap.kernels import stream_mma

                rows = ops.norm_linear_rows if ops.norm_linear is not None else 1  # with norm_gemv: its rows too
                rows = NORM_LINEAR_MAX_ROWS if stream_mma.RUNTIME else rows  # 2 to 16 rows: stream_mma
                ops = dataclasses.replace(ops, norm_linear=streamed_norm_linear(ops), norm_linear_rows=rows)
        for m in self.modules():
            if isinstance(m, (Block, Attention, MLP, RMSNorm)):
                m.ops = ops
        return self

    @property
    def syncs(self) -> list[Sync]:
        return [m for m in self.modules() if isinstance(m, Sync)]

    @property
    def sync_calls(self) -> int:
        """Sync points run so far (all blocks); a forward adds 2L - #SPD."""
        return sum(s.calls for s in self.syncs)

    def setup_caches(self, max_batch: int, max_seq: int) -> None:
        """(Re)allocate every block's KV cache and the RoPE tables for max_batch x max_seq positions."""
        p = self.output.weight
        for block in self.layers:
            block.attn.kv_cache = None  # free the old cache before allocating the new one
        for block in self.layers:
            a = block.attn
            block.attn.kv_cache = KVCache(max_batch, a.n_kv_heads, max_seq, a.head_dim, p.dtype, p.device)
        freqs = torch.arange(max_seq, dtype=torch.float32)[:, None] * rope_inv_freq(self.args)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1).to(p.device)  # (Lmax, Dh) float32, like transformers
        half = emb.shape[-1] // 2
        sin = emb.sin()
        self.register_buffer("rope_cos", emb.cos(), persistent=False)
        self.register_buffer("rope_sin_signed", torch.cat([-sin[:, :half], sin[:, half:]], -1), persistent=False)
        self.max_batch, self.max_seq = max_batch, max_seq

    def forward(self, tokens, input_pos, kv_len: int, chunk_start: int | None, last_only: bool = False,
                block_fn=None):
        """tokens (B, S) at positions input_pos (S,) -> logits (B, S, V) (or (B, 1, V) if last_only).

        Attention reads cache positions [0, kv_len). chunk_start is the Python position of tokens[:, 0]
        in prefill (0: plain causal, flash attention) or None in decode (positions only on the device).
        block_fn(block, x, cos, sin, input_pos, mask, kv_len) runs each block instead of block(...)
        (run_block, or compiled_block(): torch.compile'd once for every block of a kind).
        """
        if self.max_seq == 0:
            raise RuntimeError("no KV cache: call setup_caches(max_batch, max_seq) (or use overlap.runtime.Runtime)")
        x = self.tok_embeddings(tokens)  # (B, S, D)
        cos, sin, mask = self.chunk_inputs(input_pos, kv_len, chunk_start, x.dtype)
        for block in self.layers:
            x = (block_fn or run_block)(block, x, cos, sin, input_pos, mask, kv_len)
        if last_only:
            x = x[:, -1:]  # (B, 1, D)
        return self.output(self.norm(x))  # (B, S, V); replicated lm_head, so logits agree on all ranks

    def chunk_inputs(self, input_pos: torch.Tensor, kv_len: int, chunk_start: int | None, dtype):
        """RoPE tables cos, sin (S, 1, Dh) and the mask (see attend) of positions input_pos (S,).

        chunk_start 0: no mask (plain causal); a later prefill chunk: causal_lower_right(S, kv_len), with
        kv_len = chunk_start + S; None (decode, positions only on the device): an additive (S, kv_len) mask.
        """
        cos = self.rope_cos[input_pos].to(dtype)[:, None]  # (S, 1, Dh)
        sin = self.rope_sin_signed[input_pos].to(dtype)[:, None]  # (S, 1, Dh)
        if chunk_start is not None:  # prefill
            return cos, sin, causal_lower_right(input_pos.shape[0], kv_len) if chunk_start else None
        return cos, sin, decode_mask(input_pos, kv_len, dtype)

    @classmethod
    def from_hf(cls, hf_model) -> "Transformer":
        """Copy a transformers LlamaForCausalLM (plain or SPD-emulated: same parameter names)."""
        if getattr(hf_model.config, "model_type", None) != "llama":
            raise ModelLoadError(f"from_hf needs a LlamaForCausalLM, got {type(hf_model).__name__}")
        args = ModelArgs.from_hf_config(hf_model.config)
        sd = hf_model.state_dict()
        ref = sd["model.embed_tokens.weight"]
        with torch.device("meta"):
            model = cls(args)
        model.to(ref.dtype).to_empty(device=ref.device)  # dtype first: meta casts are free
        if args.tie_embeddings:
            model.output.weight = model.tok_embeddings.weight
        with torch.no_grad():
            model.tok_embeddings.weight.copy_(ref)
            model.norm.weight.copy_(sd["model.norm.weight"])
            if not args.tie_embeddings:
                model.output.weight.copy_(sd.get("lm_head.weight", ref))
            for i, block in enumerate(model.layers):
                p = f"model.layers.{i}."
                block.attn_norm.weight.copy_(sd[p + "input_layernorm.weight"])
                block.mlp_norm.weight.copy_(sd[p + "post_attention_layernorm.weight"])
                block.attn.wqkv.weight.copy_(torch.cat([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]))
                block.attn.wo.weight.copy_(sd[p + "self_attn.o_proj.weight"])
                block.mlp.w13.weight.copy_(torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]]))
                block.mlp.w2.weight.copy_(sd[p + "mlp.down_proj.weight"])
        return model.eval()

    @classmethod
    def from_args(cls, args: ModelArgs, device="cpu", dtype=torch.float32, seed: int = 0) -> "Transformer":
        """The full model with seeded random weights, allocated directly on device in dtype."""
        with torch.device("meta"):
            model = cls(args)
        model.to(dtype).to_empty(device=device)  # dtype first: meta casts are free
        if args.tie_embeddings:
            model.output.weight = model.tok_embeddings.weight
        return init_weights_(model, seed).eval()


def run_block(block: Block, x, cos, sin, input_pos, mask, kv_len: int) -> torch.Tensor:
    """One block's forward, as a function of the block (what compiled_block compiles)."""
    return block(x, cos, sin, input_pos, mask, kv_len)


_COMPILED_BLOCK: list = []


def compiled_block():
    """run_block torch.compile'd (fullgraph, static shapes), shared by every model: regional compilation.

    The block is an input (its parameters lifted as graph inputs), so one graph serves every block of a
    kind (baseline, SPD, nocomm) and batch size instead of tracing all 80 layers of a step: seconds, not
    minutes. Sync.forward traces as a functional all-reduce, kept a single collective in the graph.
    """
    if not _COMPILED_BLOCK:
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)  # kinds x batch sizes of a job
        _COMPILED_BLOCK.append(torch.compile(run_block, fullgraph=True, dynamic=False))
    return _COMPILED_BLOCK[0]


@torch.no_grad()
def init_weights_(model: nn.Module, seed: int = 0, std: float = INIT_STD) -> nn.Module:
    """Norm weights 1, every other weight N(0, std^2), drawn on its device from one seeded generator."""
    params = dict(model.named_parameters())  # tied weights appear once
    device = next(iter(params.values())).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in params.items():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, std, generator=gen)
    return model
