"""Megatron tensor parallelism applied from outside: shard_ slices a Transformer's weights in place.

Rank r of R keeps (ownership from spd.layout.TPLayout, the same arithmetic as spd.block's emulation):

    wqkv  column-parallel: rows of r's query heads, then k and v rows of its KV heads
          (a KV head is replicated on R/KV ranks when R > KV)
    wo    row-parallel: the columns of r's query heads        -> output is r's partial a_r
    w13   column-parallel: r's FFN rows of gate, then of up (slices may differ in size by one)
    w2    row-parallel: the columns of r's FFN rows           -> output is r's partial
    tok_embeddings, output (lm_head), norms: replicated. The simplest choice: logits need no gather and
          agree on every rank; it costs one full lm_head GEMM per rank (~0.1 ms a 70B decode token).

Head order: weights are used in their stored order, exactly like spd.block's emulation. plan.head_perm
is NOT applied here: head grouping permutes W_q/W_k/W_v rows and W_o columns in place before export,
so checkpoints exported by spd-export already hold the permuted order (applying it again would be wrong).
"""

from __future__ import annotations

import torch
from torch import nn

from overlap.context import TPContext
from overlap.model import ModelArgs, Transformer, init_weights_
from spd.errors import ParallelConfigError, PlanError
from spd.layout import TPLayout
from spd.plan import SPDPlan


def layout_of(args: ModelArgs, tp: int) -> TPLayout:
    """The TPLayout of args at degree tp (raises ParallelConfigError listing the valid degrees)."""
    return TPLayout(tp=tp, num_heads=args.n_heads, num_kv_heads=args.n_kv_heads, head_dim=args.head_dim,
                    intermediate_size=args.ffn_dim)


def _rows(w: torch.Tensor, spans: list[tuple[int, int]], dim: int = 0) -> nn.Parameter:
    """The concatenation of w's [start, stop) spans along dim, as a new contiguous Parameter (meta-safe)."""
    if w.is_meta:  # shapes only; torch.cat on meta would import torch._dynamo (seconds per rank)
        shape = list(w.shape)
        shape[dim] = sum(stop - start for start, stop in spans)
        return nn.Parameter(torch.empty(shape, dtype=w.dtype, device="meta"), requires_grad=False)
    parts = [w.narrow(dim, start, stop - start) for start, stop in spans]
    return nn.Parameter(torch.cat(parts, dim=dim).contiguous(), requires_grad=False)


@torch.no_grad()
def shard_(model: Transformer, ctx: TPContext, plan: SPDPlan | None = None) -> Transformer:
    """Keep only ctx.rank's slices of every block's weights, bind the sync points to ctx; returns model.

    Works on real weights (from_hf, from_args) and on meta ones (build_sharded), so a 70B model is
    never materialised whole on one rank. With a plan, its blocks become SPD blocks (set_plan_).
    """
    if model.tp != 1:
        raise ParallelConfigError(f"model is already sharded (tp={model.tp}); shard a fresh unsharded model")
    args, r = model.args, ctx.rank
    layout = layout_of(args, ctx.world_size)
    Dh, H, KV = args.head_dim, args.n_heads, args.n_kv_heads
    q, kv = layout.q_heads(r), layout.kv_heads(r)
    ffn = layout.ffn_rows(r)
    q_span = (q.start * Dh, q.stop * Dh)
    k_span = (H * Dh + kv.start * Dh, H * Dh + kv.stop * Dh)
    v_span = ((H + KV) * Dh + kv.start * Dh, (H + KV) * Dh + kv.stop * Dh)
    for block in model.layers:
        attn, mlp = block.attn, block.mlp
        attn.wqkv.weight = _rows(attn.wqkv.weight, [q_span, k_span, v_span])  # ((H/R + 2 KV/R) Dh, D)
        attn.wo.weight = _rows(attn.wo.weight, [q_span], dim=1)  # (D, H/R Dh)
        attn.n_heads, attn.n_kv_heads = len(q), len(kv)
        mlp.w13.weight = _rows(mlp.w13.weight, [(ffn.start, ffn.stop),
                                                (args.ffn_dim + ffn.start, args.ffn_dim + ffn.stop)])  # (2 F_r, D)
        mlp.w2.weight = _rows(mlp.w2.weight, [(ffn.start, ffn.stop)], dim=1)  # (D, F_r)
        mlp.ffn_dim = ffn.stop - ffn.start
        for sync in (block.attn_sync, block.mlp_sync, block.block_sync):
            sync.ctx = ctx
    model.tp, model.rank = ctx.world_size, r
    if plan is not None:
        set_plan_(model, plan)
    return model


def set_plan_(model: Transformer, plan: SPDPlan | None) -> Transformer:
    """Make exactly plan's blocks SPD blocks (None: none). Recapture CUDA graphs afterwards."""
    n = len(model.layers)
    if plan is not None:
        if plan.num_layers != n:
            raise PlanError(f"the plan is for {plan.num_layers} blocks but the model has {n}")
        if plan.tp != model.tp:
            raise PlanError(f"the plan is for tp={plan.tp} but the model is sharded for tp={model.tp}; "
                            f"make a plan for this degree (spd-rank parallel.tp={model.tp})")
    blocks = set(plan.tiers) if plan is not None else set()
    for i, block in enumerate(model.layers):
        block.spd = i in blocks
    return model


def spd_share_plan(num_layers: int, tp: int, share: float) -> SPDPlan:
    """SPD on the last round(share * L) blocks (for latency which blocks does not matter)."""
    k = round(share * num_layers)
    return SPDPlan.zero_shot(tp, num_layers, range(num_layers - k, num_layers), model="share")


def set_nocomm_(model: Transformer, on: bool = True) -> Transformer:
    """Skip (True) or restore (False) every collective; the forward is then wrong, but a lower bound."""
    for sync in model.syncs:
        sync.nocomm = on
    return model


def set_impl_(model: Transformer, ctx: TPContext, name: str = "nccl"):
    """Route every block's row-parallel output GEMMs + sync points through overlap.kernels' impl `name`.

    "nccl" (the default) leaves the plain path: wo / w2, then Sync.forward's in-place all-reduce (what
    torch.compile and ISO's Sync.start use). "symm_mem" / "triton": Block.forward_fused, whose sync points
    call impl.matmul_all_reduce (Sync.matmul). The impl object is built once per (model, name) and
    reused (its symmetric workspaces are collective allocations). Returns it (None for nccl). Recapture
    CUDA graphs afterwards. A name outside overlap.kernels.IMPLS raises KernelArgError listing them.
    """
    from overlap import kernels

    if name not in kernels.IMPLS:
        raise kernels.KernelArgError(f"unknown collective impl {name!r}; valid: {', '.join(kernels.IMPLS)}")
    impl = None
    if name != "nccl":
        cached = getattr(model, "_impl", None)
        impl = cached[1] if cached is not None and cached[0] == (name, ctx) else kernels.get_impl(name, ctx)
        model._impl = ((name, ctx), impl)
    for sync in model.syncs:
        sync.impl = impl
    model.impl_name = name
    return impl


def reset_sync_counts_(model: Transformer) -> Transformer:
    for sync in model.syncs:
        sync.calls = 0
    return model


def build_sharded(args: ModelArgs, ctx: TPContext, dtype=torch.bfloat16, seed: int = 0,
                  plan: SPDPlan | None = None) -> Transformer:
    """ctx.rank's shard of a random-weight model, allocated directly on ctx.device in dtype.

    The full model exists only on the meta device (no memory); each rank draws its own shard's values
    (seed + rank), so shards are not slices of one consistent model: fine for latency, not for parity
    (parity tests shard a full model built with Transformer.from_args instead).
    """
    with torch.device("meta"):
        model = Transformer(args)
    shard_(model.to(dtype), ctx, plan)
    model.to_empty(device=ctx.device)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return init_weights_(model, seed + ctx.rank).eval()
