"""The peer in the same run: transformers' own LlamaForCausalLM of one rank's shard shape (spd-bench variant
hf_compile), what a user would pick instead of this runtime for a single-GPU model of that size.

For degree R (the run's tp, or virtual_tp) it is rank 0's share as overlap.tp.shard_ cuts it: H/R query heads,
the rank's KV heads (KV/R, or one replicated head when R > KV), its FFN rows, the same hidden size, head
dimension, blocks, vocabulary and lm_head; random weights in the job's dtype (transformers' own initialiser),
no communication: the same work as our `nocomm` variant. Timed as transformers recommends for latency:

    decode   a StaticCache filled by an eager prefill of `context` tokens, then model.forward compiled with
             torch.compile(mode="reduce-overhead", fullgraph=True) (Inductor + CUDA graphs) and replayed at
             batch B; transformers keeps the static cache's position count itself (5.2x: a counter that
             each replay advances), so timed steps may decode positions context .. context + warmup + iters
             + 1 of a cache of max_cache_len = the next multiple of 64 above context + warmup + iters + 16
             (ours: position context every step, cache 2112 at context 2048)
    prefill  eager forward of S tokens, use_cache=False, logits of the last token only (as our prefill)

On CPU the decode step is compiled with backend="eager" (Dynamo's full-graph capture, no Inductor, no CUDA
graphs): the same code path, checked in CI, not a speed. Records: variant hf_compile, compile true (decode)
or false (prefill), cuda_graphs true on GPUs (decode), peer "transformers <version>", hf_attn the attention
implementation transformers picked.
"""

from __future__ import annotations

import inspect

import torch

from overlap.context import TPContext
from overlap.floors import ShardShape
from overlap.model import ModelArgs
from spd.load import torch_dtype

CACHE_MARGIN = 16  # positions beyond context + warm-up + iterations + the compiling call, before rounding up


def shard_config(args: ModelArgs, tp: int):
    """transformers' LlamaConfig of rank 0's shard at degree tp (head_dim explicit: hidden / heads changes)."""
    from transformers import LlamaConfig

    s = ShardShape(args, tp)
    return LlamaConfig(
        hidden_size=args.dim, intermediate_size=s.ffn, num_hidden_layers=args.n_layers,
        num_attention_heads=s.q_heads, num_key_value_heads=s.kv_heads, head_dim=args.head_dim,
        vocab_size=args.vocab_size, rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta,
        max_position_embeddings=32768, tie_word_embeddings=args.tie_embeddings,
    )


def build(args: ModelArgs, tp: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A random-weight LlamaForCausalLM of the shard shape, built directly on device in dtype (eval mode)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(shard_config(args, tp))
    finally:
        torch.set_default_dtype(old)
    return model.to(dtype).eval()


def static_cache(model, max_cache_len: int, batch: int, device, dtype):
    """A StaticCache across transformers' signatures (5.x: config, max_cache_len; 4.x: batch, device, dtype)."""
    from transformers import StaticCache

    try:
        return StaticCache(config=model.config, max_cache_len=max_cache_len)
    except TypeError:
        return StaticCache(config=model.config, max_batch_size=batch, max_cache_len=max_cache_len,
                           device=device, dtype=dtype)


def _cache_kwarg(model) -> str:
    """The forward's cache argument: past_key_values (transformers <= 5.2x) or cache (later 5.x)."""
    params = inspect.signature(model.forward).parameters
    return "past_key_values" if "past_key_values" in params else "cache"


def _round_up(n: int, k: int = 64) -> int:
    return -(-n // k) * k


@torch.no_grad()
def run_hf_compile(job: dict, ctx: TPContext, record, measure) -> None:
    """Time the shard-shaped transformers model on the job's prefill lengths and decode batches."""
    import transformers


    b = job["bench"]
    args = ModelArgs.from_model_config(job["model"])
    dtype = torch_dtype(job["model"].get("dtype", "bfloat16"))
    cuda = ctx.device.type == "cuda"
    model = build(args, ctx.world_size, ctx.device, dtype, int(job["model"].get("seed", 0)))
    peer = dict(variant="hf_compile", spd_blocks=0, iso_chunks=1, peer=f"transformers {transformers.__version__}",
                hf_attn=getattr(model.config, "_attn_implementation", None))
    gen = torch.Generator().manual_seed(int(job["model"].get("seed", 0)) + 1)
    if "prefill" in b["phases"]:
        for S in b["tokens"]:
            ids = torch.randint(0, args.vocab_size, (1, S), generator=gen).to(ctx.device)  # (1, S)
            times = measure(lambda: model(ids, use_cache=False, logits_to_keep=1), ctx, b["warmup"], b["iters"])
            record(times, phase="prefill", tokens=S, batch=1, context=0, cuda_graphs=False, compile=False, **peer)
    if "decode" in b["phases"]:
        context, kw = int(b["context"]), _cache_kwarg(model)
        # One compiled callable for every batch: Dynamo specialises (recompiles) on the batch size. Should this
        # transformers version break the graph, compile without fullgraph and say so (hf_fullgraph false).
        opts = dict(mode="reduce-overhead") if cuda else dict(backend="eager")
        fullgraph = True
        step_fn = torch.compile(model.forward, fullgraph=True, dynamic=False, **opts)
        for B in b["batches"]:
            max_len = _round_up(context + b["warmup"] + b["iters"] + CACHE_MARGIN)
            cache = static_cache(model, max_len, B, ctx.device, dtype)
            ids = torch.randint(0, args.vocab_size, (B, context), generator=gen).to(ctx.device)  # (B, context)
            model(ids, use_cache=True, logits_to_keep=1, **{kw: cache})  # eager prefill fills positions < context
            tok = ids[:, -1:].clone()  # (B, 1)
            pos = torch.full((B, 1), context, dtype=torch.long, device=ctx.device)  # (B, 1)

            def step():
                if cuda:
                    torch.compiler.cudagraph_mark_step_begin()
                step_fn(tok, position_ids=pos, use_cache=True, logits_to_keep=1, **{kw: cache})

            try:
                step()  # compiles (the first call of this batch size)
            except Exception as e:  # noqa: BLE001 - a graph break under fullgraph: retry as a user would
                if not fullgraph:
                    raise
                print(f"[spd-bench] hf_compile: fullgraph capture failed ({type(e).__name__}: {str(e)[:300]}); "
                      f"compiling with graph breaks", flush=True)
                torch._dynamo.reset()
                fullgraph = False
                step_fn = torch.compile(model.forward, fullgraph=False, dynamic=False, **opts)
                step()
            times = measure(step, ctx, b["warmup"], b["iters"])
            record(times, phase="decode", tokens=1, batch=B, context=context, cuda_graphs=cuda, compile=True,
                   hf_cache_len=max_len, hf_fullgraph=fullgraph, **peer)
            del cache
    del model
    if cuda:
        torch.cuda.empty_cache()
