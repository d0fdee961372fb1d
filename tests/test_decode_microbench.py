"""scripts/decode_microbench.py's CPU-testable parts (the measurements themselves need a GPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "decode_microbench.py"


def load_script():
    spec = importlib.util.spec_from_file_location("decode_microbench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Kernel:  # a compiled Triton kernel: registers, spills, metadata.shared and its PTX
    def __init__(self, regs, spills, smem=None, ptx=""):
        self.n_regs, self.n_spills = regs, spills
        self.metadata = type("Metadata", (), {"shared": smem})()
        self.asm = {"ptx": ptx}


class _Jit:  # a Triton JITFunction's device caches, in the tuple layouts of recent versions
    def __init__(self, caches):
        self.device_caches = caches


def test_compiled_resources_reads_registers_spills_smem_and_cp_async_of_each_compiled_variant():
    mb = load_script()
    launched = {"a": _Kernel(255, 24, 32768, "cp.async.ca x;\ncp.async.commit_group;"), "b": _Kernel(183, 0, 0, "ld.global"),
                "c": _Kernel(None, None)}  # c: compiled, not launched
    want = {"a": dict(regs=255, spills=24, smem=32768, cp_async=2), "b": dict(regs=183, spills=0, smem=0, cp_async=0)}
    assert mb.compiled_resources(_Jit({0: (launched, {}, "target", None, None)})) == want
    assert mb.compiled_resources(_Jit({0: (launched, "target", None, None)})) == want
    assert mb.compiled_resources(object()) == {}  # the CPU interpreter's function: nothing compiled


def test_attention_grid_covers_every_chunking_at_both_warp_counts():
    mb = load_script()
    uncapped = [(p, w, b) for p, w, b, cap in mb.ATTENTION_GRID if cap is None]
    per_sm = {p for p, w, b in uncapped if w == 4 and b == 64}
    assert per_sm == {p for p, w, b in uncapped if w == 8} | {1.9} and {0.5, 1, 2, 4, 8} <= per_sm
    assert {b for _, _, b in uncapped} == {32, 64, 128}
    assert {cap for *_, cap in mb.ATTENTION_GRID} == {None, 128, 168}  # register caps swept at one-wave chunkings


def test_pdl_wait_waiter_reads_its_row_in_the_interpreter():
    """The pdl_wait case's waiter kernel (Triton's CPU interpreter): program p stores the sum of squares of row
    p % M of y, the whole row when heavy, its first eighth of the (power-of-two) tile otherwise."""
    from interpreted import run_interpreted

    out = run_interpreted(__file__, "waiter")
    y = torch.tensor(out["y"])
    rows = [p % y.shape[0] for p in range(out["programs"])]
    assert torch.allclose(torch.tensor(out["heavy"]), (y[rows] ** 2).sum(1), rtol=1e-5)
    assert torch.allclose(torch.tensor(out["light"]), (y[rows, :16] ** 2).sum(1), rtol=1e-5)  # 128 // 8 columns
    assert 0 in load_script().PDL_WAIT_PROGRAMS  # the GEMV alone, the case every waiter is compared with


def _waiter_case() -> dict:
    mb = load_script()
    y = torch.randn(3, 100, generator=torch.Generator().manual_seed(0))
    res = {"y": y.tolist(), "programs": 7}
    for heavy in (True, False):
        out = torch.zeros(7)
        mb.waiter(y, out, 7, heavy, pdl=True)  # pdl: no wait on the CPU
        res["heavy" if heavy else "light"] = out.tolist()
    return res


if __name__ == "__main__":
    import json
    import os
    import sys

    assert os.environ.get("TRITON_INTERPRET") == "1", "run through the tests (they set TRITON_INTERPRET=1)"
    print(json.dumps({"waiter": _waiter_case}[sys.argv[1]]()))
