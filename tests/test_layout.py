"""Tensor-parallel layout arithmetic."""

import pytest

from spd.errors import ParallelConfigError
from spd.layout import TPLayout, valid_tp_degrees


def test_valid_degrees():
    assert valid_tp_degrees(9, 3) == [1, 3, 9]  # SmolLM2-135M
    assert valid_tp_degrees(64, 8) == [1, 2, 4, 8, 16, 32, 64]  # LLaMA-2-70B
    assert valid_tp_degrees(12, 4) == [1, 2, 4, 12]  # 3 and 6 would split a KV group across ranks


@pytest.mark.parametrize("tp,heads,kv", [(1, 8, 4), (2, 8, 4), (4, 8, 4), (8, 8, 4), (3, 9, 3), (9, 9, 3)])
def test_every_query_head_is_with_its_kv_head(tp, heads, kv):
    lay = TPLayout(tp, heads, kv, 16, 100)
    seen = []
    for r in range(tp):
        seen += list(lay.q_heads(r))
        assert {h // (heads // kv) for h in lay.q_heads(r)} == set(lay.kv_heads(r))
        assert len(lay.kv_heads(r)) == lay.kv_heads_per_rank
    assert seen == list(range(heads))
    assert lay.kv_replication == max(tp // kv, 1)


def test_uneven_ffn_split_covers_all_rows():
    lay = TPLayout(9, 9, 3, 64, 1536)
    sizes = lay.ffn_sizes()
    assert sum(sizes) == 1536 and max(sizes) - min(sizes) == 1
    assert [lay.ffn_rows(r).start for r in range(9)] == [sum(sizes[:r]) for r in range(9)]


def test_bad_degree_message_lists_valid_ones():
    with pytest.raises(ParallelConfigError, match="tp=4 does not fit 9 attention heads.*valid degrees: 1, 3, 9"):
        TPLayout(4, 9, 3, 64, 1536)
