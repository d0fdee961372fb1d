"""Tensor-parallel layout: which query heads, KV heads and FFN rows each of R ranks owns.

Megatron layout over R ranks. Query heads: rank r owns heads [r*H/R, (r+1)*H/R), so R must divide H.
With grouped-query attention query head h reads KV head h // (H/KV), so a rank's query heads stay with
their KV heads when either R divides KV (rank r owns KV heads [r*KV/R, (r+1)*KV/R)) or KV divides R
(each KV head is replicated on R/KV ranks, as vLLM does). FFN rows (gate/up outputs, down inputs) are
split into R contiguous slices whose sizes differ by at most one, like torch.tensor_split, so F need not
be divisible by R (SmolLM2-135M: F = 1536 at R = 9). The layout is pure arithmetic: spd/ uses it for
the single-device emulation and overlap/ for real sharding, so both agree by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

from spd.block import ffn_sizes
from spd.errors import ParallelConfigError


def valid_tp_degrees(num_heads: int, num_kv_heads: int) -> list[int]:
    """All R that divide the query heads and either divide or are a multiple of the KV heads."""
    return [
        r
        for r in range(1, num_heads + 1)
        if num_heads % r == 0 and (num_kv_heads % r == 0 or r % num_kv_heads == 0)
    ]


@dataclass(frozen=True)
class TPLayout:
    """Per-rank ownership of heads and FFN rows for one tensor-parallel degree."""

    tp: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int

    def __post_init__(self) -> None:
        valid = valid_tp_degrees(self.num_heads, self.num_kv_heads)
        if self.tp not in valid:
            raise ParallelConfigError(
                f"tp={self.tp} does not fit {self.num_heads} attention heads and {self.num_kv_heads} KV "
                f"heads (R must divide the heads and divide or be a multiple of the KV heads); "
                f"valid degrees: {', '.join(map(str, valid))}"
            )

    @property
    def heads_per_rank(self) -> int:
        return self.num_heads // self.tp

    @property
    def kv_heads_per_rank(self) -> int:
        return max(self.num_kv_heads // self.tp, 1)

    @property
    def kv_replication(self) -> int:
        """How many ranks hold a copy of each KV head (1 when R <= KV)."""
        return max(self.tp // self.num_kv_heads, 1)

    def q_heads(self, rank: int) -> range:
        n = self.heads_per_rank
        return range(rank * n, (rank + 1) * n)

    def kv_heads(self, rank: int) -> range:
        if self.tp <= self.num_kv_heads:
            n = self.kv_heads_per_rank
            return range(rank * n, (rank + 1) * n)
        first = rank // self.kv_replication
        return range(first, first + 1)

    def ffn_sizes(self) -> list[int]:
        return ffn_sizes(self.intermediate_size, self.tp)

    def ffn_rows(self, rank: int) -> slice:
        sizes = self.ffn_sizes()
        start = sum(sizes[:rank])
        return slice(start, start + sizes[rank])


def layout_for(config, tp: int) -> TPLayout:
    """TPLayout of a transformers LlamaConfig (or anything with the same attribute names) at degree tp."""
    heads = config.num_attention_heads
    return TPLayout(
        tp=tp,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        intermediate_size=config.intermediate_size,
    )
