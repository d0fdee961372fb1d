"""Inference over a (sharded) Transformer with a static KV cache: prefill, decode_one, greedy generate.

Every rank runs the same calls in the same order (the sync points inside are collectives).

prefill(tokens, start=p) runs a chunk at positions [p, p+S): it writes the chunk's K/V into the cache
and attends to cache positions [0, p+S) with a bottom-right aligned causal mask (token i sees j <= p+i);
p = 0 is plain causal attention (flash). Prefill in two chunks equals prefill at once, which is the
piece ISO needs: prefill(..., iso=k) cuts the chunk into k cost-balanced pieces whose all-reduces run
on a communication stream while the other pieces compute (overlap.iso), with the same logits.

decode_one(token) runs one position for every sequence of the batch, attending over the whole static
cache (masked beyond the position), so its shapes never change: on CUDA the step is captured once per
batch size in a CUDA graph (warm-up on a side stream first; NCCL collectives are captured too) and
replayed; optionally (compile=True) each block of the step runs torch.compile'd before capture, one
graph per block kind reused across layers, to fuse the small ops. The position
lives in a device tensor, so no host sync happens inside a step.

impl ("nccl", "symm_mem", "triton"; overlap.kernels) picks how the row-parallel output projections and
their all-reduces run: nccl is the plain path (GEMM, then Sync's all-reduce); the others fuse each GEMM
with its sync point (impl.matmul_all_reduce); with ISO (iso >= 2) those fused ops run on ISO's comm
stream (overlap.iso). torch.compile needs impl="nccl".

fuse=True runs the steps between the weight GEMMs (RoPE, residual add + RMSNorm, SwiGLU, RMSNorm, decode attention) as
torch.compile'd kernels (overlap.fused_ops), in prefill and decode alike; on CUDA a decode step's RoPE, cache
write and attention then run as one Triton pass (overlap.decode_attention; decode_kernel=False: compiled ops instead),
and with norm_gemv=True each norm and the GEMV after it (+ SwiGLU) too (overlap.kernels.norm_gemv); with
triton_gemv=True the wqkv and w13 decode GEMVs run through that kernel without the norm; with swiglu_gemv=True
decode's SwiGLU runs in the epilogue of w13's GEMV (the same kernel); with pdl=True every kernel of a decode step's blocks
launches with programmatic dependent launch (wo and w2 through the Triton GEMV too). set_iso_ picks ISO's
process group (NCCL thread blocks capped, overlap.context.comm_group) and an SM carve-out for cuBLAS
GEMMs during ISO prefill (the GEMMs leave SMs to the NCCL kernels they overlap).
"""

from __future__ import annotations

import torch

from overlap.context import TPContext, comm_group
from overlap.iso import attention_weight, iso_forward, split_bounds
from overlap.model import Transformer, compiled_block
from overlap.tp import set_impl_

GRAPH_WARMUP = 3  # eager steps on a side stream before capture (allocator, cuBLAS and NCCL setup)
ISO_ALIGN = 128  # ISO boundaries on multiples of 128 tokens: whole GEMM and flash-attention row tiles


class Runtime:
    """Prefill/decode state of one model: its cache, the next position and the captured decode graphs."""

    def __init__(self, model: Transformer, ctx: TPContext, max_batch: int, max_seq: int,
                 cuda_graphs: bool | None = None, compile: bool = False, impl: str = "nccl", fuse: bool = False,
                 decode_kernel: bool = True, prefill_graphs: bool = False, norm_gemv: bool = False,
                 triton_gemv: bool = False, swiglu_gemv: bool = False, pdl: bool = False,
                 stream_gemv: bool = False):
        self.model, self.ctx = model, ctx
        # prefill_graphs: a plain prefill (iso 1, impl nccl) of a given (batch, length, start) is captured once
        # and replayed (CUDA only). Measured on one H200 (R = 4 and 8 shards, 2048 and 8192 tokens): within 0.7%
        # of the eager prefill, whose launches keep ahead of the GPU (docs/benchmarks/spd_bench.md); kept as the
        # A/B switch that shows it, off by default.
        self.prefill_graphs = bool(prefill_graphs) and model.output.weight.device.type == "cuda" and impl == "nccl"
        self.device = model.output.weight.device
        if pdl and self.device.type == "cuda" and torch.cuda.get_device_capability(self.device)[0] < 9:
            raise ValueError(f"pdl=True needs a GPU of compute capability >= 9 (Hopper); "
                             f"{torch.cuda.get_device_name(self.device)} has "
                             f"{torch.cuda.get_device_capability(self.device)}: pass pdl=False")
        model.set_fused_(fuse, decode_kernel=decode_kernel, norm_gemv=norm_gemv, triton_gemv=triton_gemv,
                         swiglu_gemv=swiglu_gemv, pdl=pdl, stream_gemv=stream_gemv)
        if compile and impl != "nccl":
            raise ValueError(f"compile=True needs impl='nccl' (impl {impl!r}'s kernels and symmetric-memory "
                             f"collectives are not traced by torch.compile); supported: compile with nccl, "
                             f"or symm_mem / triton eager (CUDA graphs allowed)")
        self.impl_name = impl
        self.impl = set_impl_(model, ctx, impl)  # None for nccl (the plain path); raises on a bad name
        model.setup_caches(max_batch, max_seq)
        self.cuda_graphs = (self.device.type == "cuda") if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs a model on a CUDA device")
        if self.impl is not None and self.cuda_graphs:  # workspaces may not grow during capture
            self.impl.reserve(max_tokens=max_batch, n=model.args.dim, dtype=model.output.weight.dtype)
        # compile: every block of a decode step through one torch.compile'd function (regional compilation,
        # overlap.model.compiled_block); embedding, mask and lm_head stay eager. All inside the CUDA graph.
        self._block_fn = compiled_block() if compile else None
        self._pos_t = torch.zeros(1, dtype=torch.long, device=self.device)  # (1,) decode position
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._pool = None
        self.pos = 0  # next position to write (same on every rank)
        # ISO's all-reduces, all issued from this one stream (CUDA); None on CPU, where gloo needs none.
        self.comm_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.iso_group, self.iso_sm_carveout = None, None  # set_iso_: the context's group, no carve-out

    def set_iso_(self, max_ctas: int | None = None, sm_carveout: int | None = None, high_priority: bool = False):
        """ISO's all-reduces on a group with at most max_ctas NCCL thread blocks (None: NCCL's choice) and a
        high-priority NCCL stream; sm_carveout SMs left free by cuBLAS GEMMs during ISO prefill (None: none).

        Collective when it creates a group (overlap.context.comm_group): call it on every rank alike.
        """
        if sm_carveout is not None and not 0 <= sm_carveout < 128:
            raise ValueError(f"sm_carveout must be in [0, 128) SMs, got {sm_carveout}")
        self.iso_group = comm_group(self.ctx, max_ctas, high_priority)
        self.iso_sm_carveout = sm_carveout or None

    @property
    def max_batch(self) -> int:
        return self.model.max_batch

    @property
    def max_seq(self) -> int:
        return self.model.max_seq

    def invalidate(self) -> None:
        """Drop captured graphs: call after set_plan_ / set_nocomm_ changed what a step does."""
        self._graphs.clear()
        self._pool = None

    def reset(self) -> None:
        """Start a new sequence (stale cache entries beyond a position are masked, never read)."""
        self.pos = 0

    def _check(self, batch: int, stop: int) -> None:
        if batch > self.max_batch:
            raise ValueError(f"batch {batch} exceeds the cache's max_batch {self.max_batch}; build the Runtime larger")
        if stop > self.max_seq:
            raise ValueError(f"positions up to {stop} exceed the cache's max_seq {self.max_seq}; "
                             f"build the Runtime with max_seq >= {stop}")

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, start: int = 0, last_only: bool = False, iso: int = 1) -> torch.Tensor:
        """tokens (B, S) at positions [start, start+S) -> logits (B, S, V) ((B, 1, V) if last_only).

        iso = k >= 2: ISO, k pieces split by overlap.iso.split_bounds (at most S), each piece's all-reduces
        overlapping the others' compute; k (2L - #SPD) all-reduces, the same logits as iso = 1. With
        prefill_graphs (iso 1) the returned logits are the graph's static output: read or clone them before
        the next prefill of the same shape.
        """
        B, S = tokens.shape
        self._check(B, start + S)
        if iso > 1:
            bounds = split_bounds(start, start + S, iso, attention_weight(self.model.args), align=ISO_ALIGN)
            carveout = self.iso_sm_carveout is not None and self.device.type == "cuda"
            if carveout:
                torch._C._set_sm_carveout_experimental(self.iso_sm_carveout)
            try:
                logits = iso_forward(self.model, tokens, bounds, self.comm_stream, last_only=last_only,
                                     group=self.iso_group)
            finally:
                if carveout:
                    torch._C._set_sm_carveout_experimental(None)
            self.pos = start + S
            return logits
        if self.prefill_graphs:
            graph, static_tokens, logits = self._prefill_graph(B, S, start, last_only)
            static_tokens.copy_(tokens)
            graph.replay()
        else:
            logits = self._prefill(tokens, start, last_only)
        self.pos = start + S
        return logits

    def _prefill(self, tokens: torch.Tensor, start: int, last_only: bool) -> torch.Tensor:
        input_pos = torch.arange(start, start + tokens.shape[1], device=self.device)  # (S,)
        return self.model(tokens, input_pos, kv_len=start + tokens.shape[1], chunk_start=start, last_only=last_only)

    def _prefill_graph(self, batch: int, length: int, start: int, last_only: bool):
        """The captured prefill of (batch, length) tokens at positions [start, start + length): (graph, static
        tokens (B, S), static logits). Its own memory pool (a prefill's activations are large; a decode graph's
        static output must survive it). The warm-up writes the same cache positions the replays write."""
        key = ("prefill", batch, length, start, last_only)
        if key not in self._graphs:
            tokens = torch.zeros(batch, length, dtype=torch.long, device=self.device)  # (B, S) static input
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._prefill(tokens, start, last_only)  # compiles the fused ops, allocates cuBLAS workspaces
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self._prefill(tokens, start, last_only)  # (B, S or 1, V) static output
            self._graphs[key] = (graph, tokens, logits)
        return self._graphs[key]

    def prefill_captured(self) -> int:
        """How many prefill shapes are captured (0 without prefill_graphs)."""
        return sum(1 for k in self._graphs if isinstance(k, tuple) and k[0] == "prefill")

    def _step(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.model(token, pos, kv_len=self.max_seq, chunk_start=None, block_fn=self._block_fn)  # (B, 1, V)

    def _graph(self, batch: int):
        if batch not in self._graphs:
            token = torch.zeros(batch, 1, dtype=torch.long, device=self.device)  # (B, 1) static input
            # Warm-up steps write K/V at the current position; the replay that follows overwrites it.
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(GRAPH_WARMUP):
                    self._step(token, self._pos_t)
            torch.cuda.current_stream(self.device).wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self._step(token, self._pos_t)  # (B, 1, V) static output
            self._graphs[batch] = (graph, token, logits)
        return self._graphs[batch]

    @torch.no_grad()
    def decode_one(self, token: torch.Tensor) -> torch.Tensor:
        """token (B, 1) at position self.pos -> logits (B, 1, V); advances the position.

        With CUDA graphs the returned tensor is the graph's static output: read it (or clone it)
        before the next decode_one.
        """
        B = token.shape[0]
        self._check(B, self.pos + 1)
        self._pos_t.fill_(self.pos)
        if self.cuda_graphs:
            graph, static_token, logits = self._graph(B)
            static_token.copy_(token)
            graph.replay()
        else:
            logits = self._step(token, self._pos_t)
        self.pos += 1
        return logits

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation: prompt (B, S) -> (B, S + max_new_tokens), the prompt included."""
        self.reset()
        out = [prompt]
        if max_new_tokens <= 0:
            return prompt
        token = self.prefill(prompt, last_only=True).argmax(-1)  # (B, 1)
        out.append(token)
        for _ in range(max_new_tokens - 1):
            token = self.decode_one(token).argmax(-1)  # (B, 1)
            out.append(token)
        return torch.cat(out, dim=1)
