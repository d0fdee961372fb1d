"""Runtime(prefill_graphs=True): a captured prefill computes what the eager one does (GPU), and is off on CPU."""

import pytest
import torch

from overlap.context import single
from overlap.model import ModelArgs
from overlap.runtime import Runtime
from overlap.tp import build_sharded

TINY = ModelArgs(vocab_size=512, dim=64, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=172)


def test_prefill_graphs_are_off_on_cpu_and_the_prefill_is_the_eager_one():
    model = build_sharded(TINY, single("cpu"), dtype=torch.float32)
    ids = torch.randint(0, TINY.vocab_size, (1, 16))
    rt = Runtime(model, single("cpu"), 1, 64, cuda_graphs=False, prefill_graphs=True)
    assert rt.prefill_graphs is False
    out = rt.prefill(ids, last_only=True).clone()
    assert rt.prefill_captured() == 0 and rt.pos == 16
    ref = Runtime(model, single("cpu"), 1, 64, cuda_graphs=False).prefill(ids, last_only=True)
    assert torch.equal(out, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fuse", [False, True])
def test_a_captured_prefill_matches_the_eager_one_on_fresh_tokens_every_replay(fuse):
    ctx = single("cuda")
    model = build_sharded(TINY, ctx, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    for S, last_only in ((64, True), (128, False)):
        eager = Runtime(model, ctx, 1, 192, cuda_graphs=False, fuse=fuse)
        refs = []
        for _ in range(3):  # fresh tokens each time: the replay must read the copied input
            ids = torch.randint(0, TINY.vocab_size, (1, S), generator=g).cuda()
            logits = eager.prefill(ids, last_only=last_only).float().clone()
            refs.append((ids, logits, model.layers[-1].attn.kv_cache.k[:, :, :S].clone()))
        graphed = Runtime(model, ctx, 1, 192, cuda_graphs=False, fuse=fuse, prefill_graphs=True)
        assert graphed.prefill_graphs
        for ids, ref, k_ref in refs:
            model.layers[-1].attn.kv_cache.k.fill_(float("nan"))  # poison: the replay must write the cache
            out = graphed.prefill(ids, last_only=last_only).float()
            assert torch.isfinite(out).all()
            assert (out - ref).norm() / ref.norm() < 1e-2, (out - ref).norm() / ref.norm()
            k = model.layers[-1].attn.kv_cache.k[:, :, :S].float()
            assert torch.isfinite(k).all() and (k - k_ref.float()).norm() / k_ref.float().norm() < 1e-2
            assert graphed.pos == S
        assert graphed.prefill_captured() == 1  # one capture, replayed
