"""Fused GEMM + collective ops for the tensor-parallel runtime, in three interchangeable implementations.

    impl = get_impl(name, ctx)        # name in IMPLS = ("nccl", "symm_mem", "triton"); build once, reuse

Every method is a collective over ctx.group (all ranks call it with the same shapes, in the same
order). Weights w are nn.Linear weights (out_features, in_features), as overlap.tp stores them; the
ops multiply by w.T. With ctx.world_size == 1 every method is the local computation.

    impl.matmul_all_reduce(x, w, *, add=None, residual=None)            row-parallel output + all-reduce
        x (..., K_r), w (N, K_r), add (..., N) rank-local, residual (..., N)  ->  (..., N)
        = residual + sum_r (x_r @ w_r.T + add_r)
        Baseline block: h = impl.matmul_all_reduce(attn_heads, wo, residual=x).
        SPD block:    out = impl.matmul_all_reduce(act, w2, add=a_r, residual=x).

    impl.matmul_reduce_scatter(x, w, *, add=None, residual=None)        sequence-parallel row-parallel output
        x (M, K_r), w (N, K_r), add (M, N), residual (M/R, N)  ->  (M/R, N): this rank's rows
        [r M/R, (r+1) M/R) of residual + sum_r (x_r @ w_r.T + add_r); M must divide by R.

    impl.all_gather_matmul(x_shard, w, *, prologue=None, return_gathered=False)
        x_shard (m, K) this rank's token rows, w (N_r, K) column-parallel  ->  (R m, N_r)
        = prologue(cat_s x_s) @ w.T, rows in rank order; prologue must be token-wise (an RMSNorm);
        with return_gathered also returns cat_s x_s (R m, K) (an SPD block needs the raw residual).

    impl.all_reduce(y), impl.all_gather(x_shard), impl.reduce_scatter(y)    the plain collectives
        (nccl may reduce y in place); impl.reserve(max_tokens=, n=, k=) allocates the workspaces
        before CUDA-graph capture; impl.last_path names the path the last call took.

Implementations: "nccl" = matmul then torch.distributed (also runs over gloo on CPU: the reference);
"symm_mem" = torch.ops.symm_mem fused ops and one_shot_all_reduce; "triton" = this package (fused
decode GEMV + all-reduce kernel, one-shot pull kernels, copy-engine pipelines). docs/kernels.md has the
designs, the signal protocol and the memory-ordering argument.
"""

from __future__ import annotations

from overlap.kernels.checks import KernelArgError, KernelUnavailableError

IMPLS = ("nccl", "symm_mem", "triton")


def get_impl(name: str, ctx, **options):
    """The implementation `name` bound to ctx (a TPContext); options go to its constructor.

    symm_mem: one_shot_max_bytes. triton: one_shot_max_bytes, pipeline_min_rows, max_spin.
    """
    if name not in IMPLS:
        raise KernelArgError(f"unknown kernel impl {name!r}; valid: {', '.join(IMPLS)}")
    from overlap.kernels import impl

    if name == "nccl" and options:
        raise KernelArgError(f"impl 'nccl' takes no options, got {', '.join(options)}")
    if ctx.world_size == 1:  # nothing to communicate: every impl is the local computation
        local = impl.NcclImpl(ctx)
        local.name, local.last_path = name, "local"
        return local
    cls = {"nccl": impl.NcclImpl, "symm_mem": impl.SymmMemImpl, "triton": impl.TritonImpl}[name]
    return cls(ctx, **options)

__all__ = ["IMPLS", "KernelArgError", "KernelUnavailableError", "get_impl"]
