"""tests/test_overlap_gpu.py's LLaMA-2-7B-shape parity numbers at R ranks on ONE GPU: R gloo ranks share cuda:0
(eager prefill, no CUDA graphs), so the TP arithmetic can be checked where no R GPUs are lent.

    python remote_gpu/parity_on_one_gpu.py [R]

Every rank builds the same seeded random model, runs it whole (R = 1) and sharded, in bf16 and fp32, and
prints the relative L2 errors of the prefill logits. With R = 2 a bf16 sum of two partials rounds the same
whatever the transport, so these are NCCL's numbers too (checked in session 3: bf16 TP against bf16 R = 1
5.547e-02 here and in the NCCL run on 2x H200).
"""
import sys
import time

import torch

from overlap.context import TPContext
from overlap.launch import spawn_ranks
from overlap.model import ModelArgs, Transformer
from overlap.runtime import Runtime
from overlap.tp import shard_

LLAMA2_7B = ModelArgs(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008)


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def worker(ctx, args, prompt):
    """This rank's prefill logits, whole and sharded, bf16 and fp32: {(label, dtype): (1, S, V) on the CPU}."""
    gctx = TPContext(rank=ctx.rank, world_size=ctx.world_size, device=torch.device("cuda:0"), group=ctx.group,
                     backend="gloo")
    torch.cuda.set_device(0)
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        model = Transformer.from_args(args, device="cuda:0", dtype=dtype, seed=0)
        for label in ("ref", "tp"):
            if label == "tp":
                shard_(model, gctx)
            rt = Runtime(model, gctx, 1, 256, cuda_graphs=False)
            out[(label, str(dtype))] = rt.prefill(prompt.cuda()).float().cpu()
            del rt
        del model
        torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    t0 = time.time()
    prompt = torch.randint(0, 32000, (1, 96), generator=torch.Generator().manual_seed(4))
    R = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    res = spawn_ranks(worker, R, "/tmp/parity_on_one_gpu", args=(LLAMA2_7B, prompt), backend="gloo", timeout_s=400,
                      threads=4)
    for r, o in enumerate(res):
        exact = o[("ref", "torch.float32")]
        print(f"rank {r}: bf16 TP vs fp32 {rel_err(o[('tp', 'torch.bfloat16')], exact):.3e}, bf16 R=1 vs fp32 "
              f"{rel_err(o[('ref', 'torch.bfloat16')], exact):.3e}, bf16 TP vs bf16 R=1 "
              f"{rel_err(o[('tp', 'torch.bfloat16')], o[('ref', 'torch.bfloat16')]):.3e}, fp32 TP vs fp32 "
              f"{rel_err(o[('tp', 'torch.float32')], exact):.3e}  ({time.time() - t0:.0f} s)")
