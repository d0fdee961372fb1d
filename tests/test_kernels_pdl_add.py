"""overlap.kernels.pdl_add against plain torch: in Triton's CPU interpreter, and on a GPU with PDL."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from interpreted import run_interpreted


def test_matches_plain_torch_in_the_interpreter():
    """fp32 bit-equal; 16-bit sums within one unit in the last place of the fp32 sum (the interpreter's casts to
    bf16 truncate where CUDA's round to nearest: the GPU test asks for bit equality)."""
    out = run_interpreted(__file__, "kernel")
    assert out["fp32_exact"], out
    assert out["ulps"] == [True, True], out
    assert out["fallback_exact"], out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs a GPU of compute capability >= 9 (PDL)")
def test_matches_plain_torch_on_the_gpu_with_pdl():
    from overlap.kernels.pdl_add import pdl_add, reference

    g = torch.Generator(device="cuda").manual_seed(0)
    for shape in ((1, 1, 8192), (16, 1, 8192), (3, 1000)):
        x, y = (torch.randn(shape, device="cuda", generator=g).bfloat16() for _ in range(2))
        assert torch.equal(pdl_add(x, y, pdl=True), reference(x, y))


def _kernel() -> dict:
    from overlap.kernels.pdl_add import pdl_add, reference

    gen = torch.Generator().manual_seed(1)
    x, y = (torch.randn(1, 1, 3000, generator=gen) for _ in range(2))
    fp32_exact = torch.equal(pdl_add(x, y, pdl=False), reference(x, y))
    ulps = []
    for shape, dtype in (((2, 3, 1500), torch.bfloat16), ((7,), torch.float16)):
        x, y = (torch.randn(shape, generator=gen).to(dtype) for _ in range(2))
        exact = x.float() + y.float()
        ulp = torch.finfo(dtype).eps * exact.abs()  # one unit in the last place of the sum, or more
        ulps.append(bool(((pdl_add(x, y, pdl=False).float() - exact).abs() <= ulp).all()))
    x = torch.randn(4, 8, generator=gen)
    fallback = torch.equal(pdl_add(x, x[:1], pdl=False), x + x[:1])  # broadcasting: plain torch
    return {"fp32_exact": fp32_exact, "ulps": ulps, "fallback_exact": fallback}


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through the tests (they set TRITON_INTERPRET=1)"
    print(json.dumps({"kernel": _kernel}[sys.argv[1]]()))
