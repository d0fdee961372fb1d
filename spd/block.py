"""SPD blocks: R tensor-parallel ranks of a LLaMA block emulated exactly on one device.

Per rank r of R (x is the block input, the same on every rank; rank r owns query heads [rH/R, (r+1)H/R)
with their KV heads and FFN rows F_r):

    a_r = attn_r(norm1(x)) @ W_o[:, cols_r]^T                  # (B, S, D) rank r's attention partial
    baseline:  h = x + sum_r a_r;  out = h + sum_r mlp_r(norm2(h))
    SPD:       out = x + sum_r (a_r + mlp_r(norm2(x + a_r)))   # one all-reduce; rank r's MLP sees x + a_r

sum_r a_r is the full attention output, so attention, RoPE and the KV cache are untouched and R = 1 is
the original block. The emulation keeps the module tree and parameter names of LlamaDecoderLayer (the
same Parameter objects, no copies), so state_dicts, transformers' generate and lm-eval work unchanged.
Weights are used in their stored head order: head grouping permutes them in place beforehand.

This file imports only torch and transformers: spd-export copies it next to exported checkpoints so
that stock transformers can load them with trust_remote_code=True.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def offloaded_modules(*modules: nn.Module) -> list[nn.Module]:
    """The submodules (of modules, themselves included) whose weights accelerate offloaded to the CPU or disk."""
    return [m for module in modules for m in module.modules() if getattr(getattr(m, "_hf_hook", None), "offload", False)]


@contextmanager
def onloaded(*modules: nn.Module):
    """The module's weights on its execution device for the duration (no-op unless accelerate offloaded them).

    A block that accelerate's device map puts on the CPU or disk ("offload") keeps its parameters on the meta
    device, and a hook on each Linear / RMSNorm loads them for that submodule's own call. The SPD forward reads
    o_proj's and the MLP's weights directly (per rank slices), so it loads the whole block first, with the
    same hooks, and lets them drop the weights again afterwards.
    """
    hooked = offloaded_modules(*modules)
    for m in hooked:
        m._hf_hook.pre_forward(m)
    try:
        yield
    finally:
        for m in hooked:
            m._hf_hook.post_forward(m, None)


def adopt_hook(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give `new` (an SPD wrapper) the placement hook of the block it wraps (accelerate's dispatch puts one on
    every block of a model split over devices: it moves the block's inputs to the block's device)."""
    hook = getattr(old, "_hf_hook", None)
    if hook is not None:
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(new, hook)
    return new


def ffn_sizes(intermediate_size: int, tp: int) -> list[int]:
    """Rank r's FFN rows: contiguous slices differing by at most one (the one rule; spd.layout and the runtime use it)."""
    base, extra = divmod(intermediate_size, tp)
    return [base + (1 if r < extra else 0) for r in range(tp)]


class RankPartialLinear(nn.Module):
    """Row-parallel W_o on one device: each rank's heads through its columns of W_o, stacked by rank.

    Holds the original Linear's Parameters under the same names. The bias, if any, is added once
    (to rank 0's partial), as a row-parallel layer adds it after the all-reduce.
    """

    def __init__(self, linear: nn.Linear, tp: int):
        super().__init__()
        if linear.in_features % tp:
            raise ValueError(f"o_proj input width {linear.in_features} is not divisible by tp={tp}")
        self.tp = tp
        self.weight = linear.weight
        self.bias = linear.bias
        object.__setattr__(self, "linear", linear)  # outside the module tree: where offloaded weights are loaded
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if weight.is_meta:  # offloaded: onloaded() put the weights on the original Linear for this call
            weight, bias = self.linear.weight, self.linear.bias
        xr = x.unflatten(-1, (self.tp, -1))  # (*, R, H/R * Dh)
        w = weight.unflatten(1, (self.tp, -1))  # (D, R, H/R * Dh)
        out = torch.einsum("...ri,dri->r...d", xr, w)  # (R, *, D)
        if bias is not None:
            out[0] = out[0] + bias
        return out


def mlp_partials(mlp: nn.Module, z: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Rank r's MLP shard applied to z[r]: (R, *, D) -> (R, *, D); their sum over r is the full MLP."""
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    outs, start = [], 0
    for r, n in enumerate(sizes):
        rows = slice(start, start + n)
        start += n
        g = nn.functional.linear(z[r], gate.weight[rows], None if gate.bias is None else gate.bias[rows])
        u = nn.functional.linear(z[r], up.weight[rows], None if up.bias is None else up.bias[rows])
        outs.append(nn.functional.linear(mlp.act_fn(g) * u, down.weight[:, rows]))  # (*, D)
    out = torch.stack(outs)  # (R, *, D)
    if down.bias is not None:
        out[0] = out[0] + down.bias
    return out


class SPDDecoderLayer(nn.Module):
    """A LlamaDecoderLayer whose attention all-reduce is dropped at tensor-parallel degree `tp`."""

    def __init__(self, layer: nn.Module, tp: int, tier: str = "ISB"):
        super().__init__()
        self.tp, self.tier = tp, tier
        self.hidden_size = layer.hidden_size
        for name, child in layer.named_children():  # same names and order as the original block
            self.add_module(name, child)
        # Kept outside the module tree (no duplicate parameters) so remove_spd_ can restore them.
        object.__setattr__(self, "original", layer)
        object.__setattr__(self, "original_o_proj", layer.self_attn.o_proj)
        self.self_attn.o_proj = RankPartialLinear(layer.self_attn.o_proj, tp)
        self.ffn_sizes = ffn_sizes(self.mlp.gate_proj.out_features, tp)

    def attention_partials(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        """(B, S, D) block input -> (R, B, S, D) per-rank attention partials a_r."""
        out, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        return out

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        x = hidden_states  # (B, S, D)
        with onloaded(self, self.original_o_proj):
            a = self.attention_partials(x, **kwargs)  # (R, B, S, D)
            m = mlp_partials(self.mlp, self.post_attention_layernorm(x + a), self.ffn_sizes)  # (R, B, S, D)
        return x + (a + m).sum(0)  # the one all-reduce

    def restore(self) -> nn.Module:
        """The original block, holding the current parameters (a loader or training may have replaced them)."""
        partial, linear = self.self_attn.o_proj, self.original_o_proj
        linear.weight, linear.bias = partial.weight, partial.bias
        self.self_attn.o_proj = linear
        return self.original


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a LlamaForCausalLM (or of its inner LlamaModel)."""
    inner = getattr(model, "model", model)
    return inner.layers


def remove_spd_(model: nn.Module) -> nn.Module:
    """Turn every SPD block back into its original LlamaDecoderLayer, in place."""
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        if isinstance(layer, SPDDecoderLayer):
            layers[i] = layer.restore()
    return model


def spd_blocks(model: nn.Module) -> list[int]:
    return [i for i, layer in enumerate(decoder_layers(model)) if isinstance(layer, SPDDecoderLayer)]


def set_spd_(model: nn.Module, tp: int, tiers: dict[int, str]) -> nn.Module:
    """Make exactly the blocks in `tiers` SPD blocks at degree tp (others original), in place."""
    remove_spd_(model)
    layers = decoder_layers(model)
    for i, tier in sorted(tiers.items()):
        layers[i] = adopt_hook(SPDDecoderLayer(layers[i], tp, tier), layers[i])
    return model
