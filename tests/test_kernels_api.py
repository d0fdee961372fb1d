"""overlap.kernels' interface: get_impl, argument checks and their messages, and the semantics of every
op (nccl impl and the plain-torch references beside each kernel) on 2 gloo ranks against one process
computing the unsharded math."""

import pytest
import torch

from overlap.context import TPContext, single
from overlap.kernels import IMPLS, KernelArgError, KernelUnavailableError, get_impl
from overlap.kernels import all_gather_matmul as agm
from overlap.kernels import gemv_all_reduce as gar
from overlap.kernels import matmul_reduce_scatter as mrs
from overlap.kernels import one_shot
from overlap.kernels.checks import check_addend, check_decode_rows, check_matmul, check_rows_divisible
from overlap.launch import spawn_ranks

FP32_TOL = 1e-4  # fp32 GEMMs summed over 2 ranks in a different order than the single-process reference


def test_get_impl_names_and_errors():
    assert IMPLS == ("nccl", "symm_mem", "triton")
    with pytest.raises(KernelArgError, match="valid: nccl, symm_mem, triton"):
        get_impl("nvshmem", single())
    two_cpu = TPContext(rank=0, world_size=2, device=torch.device("cpu"), group=object(), backend="gloo")
    for name in ("symm_mem", "triton"):
        with pytest.raises(KernelUnavailableError, match="impl='nccl'"):
            get_impl(name, two_cpu)
    with pytest.raises(KernelArgError, match="takes no options"):
        get_impl("nccl", two_cpu, one_shot_max_bytes=1)


@pytest.mark.parametrize("name", IMPLS)
def test_one_rank_is_the_local_computation(name):
    impl = get_impl(name, single())
    assert impl.name == name and impl.last_path == "local"
    g = torch.Generator().manual_seed(0)
    x, w, add, res = (torch.randn(2, 3, 8, generator=g), torch.randn(5, 8, generator=g),
                      torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g))
    torch.testing.assert_close(impl.matmul_all_reduce(x, w, add=add, residual=res), x @ w.T + add + res)
    x2 = x.reshape(6, 8)
    torch.testing.assert_close(impl.matmul_reduce_scatter(x2, w), x2 @ w.T)
    out, full = impl.all_gather_matmul(x2, w, prologue=torch.tanh, return_gathered=True)
    torch.testing.assert_close(out, torch.tanh(x2) @ w.T)
    assert full is x2


def test_argument_checks_say_what_would_be_right():
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    assert check_matmul(x, w, "op") == (4, 6, 8)
    with pytest.raises(KernelArgError, match="not its transpose"):
        check_matmul(x, w.T.contiguous(), "op")
    with pytest.raises(KernelArgError, match=r"flatten the leading dimensions"):
        check_matmul(x.view(2, 2, 8), w, "op")
    with pytest.raises(KernelArgError, match="bfloat16"):
        check_matmul(x, w.bfloat16(), "op")
    with pytest.raises(KernelArgError, match="contiguous rows"):
        check_matmul(x, torch.randn(8, 6).T, "op")
    with pytest.raises(KernelArgError, match=r"multiple of 4 \(for example 12\) or use 8"):
        check_rows_divisible(10, 4, "op")
    with pytest.raises(KernelArgError, match="1..16 rows"):
        check_decode_rows(17, 16, "op")
    with pytest.raises(KernelArgError, match=r"residual must have shape \(4, 6\)"):
        check_addend(torch.randn(4, 5), (4, 6), x, "op", "residual")
    impl = get_impl("nccl", single())
    with pytest.raises(KernelArgError, match="add must have shape"):
        impl.matmul_all_reduce(x, w, add=torch.randn(6, 4))


def _full_problem(world: int, seed: int = 0):
    """Unsharded tensors every rank can regenerate: x (M, K), w_row (N, K), w_col (N, K), add, residual."""
    g = torch.Generator().manual_seed(seed)
    M, K, N = 6 * world, 8 * world, 10
    return {name: torch.randn(*shape, generator=g, dtype=torch.float64).float()
            for name, shape in (("x", (M, K)), ("w_row", (N, K)), ("w_col", (2 * N * world, K)),
                                ("adds", (world, M, N)), ("res", (M, N)))}


def _ops_on_rank(ctx):
    R, r = ctx.world_size, ctx.rank
    p = _full_problem(R)
    M, K = p["x"].shape
    kr, mr, nc = K // R, M // R, p["w_col"].shape[0] // R
    x_r = p["x"][:, r * kr:(r + 1) * kr]  # (M, K/R) row-parallel input: this rank's features
    w_r = p["w_row"][:, r * kr:(r + 1) * kr].contiguous()  # (N, K/R)
    add_r, rows = p["adds"][r], slice(r * mr, (r + 1) * mr)
    x_shard = p["x"][rows]  # (M/R, K) sequence-parallel shard
    w_c = p["w_col"][r * nc:(r + 1) * nc]  # (N_c/R, K) column-parallel slice
    impl = get_impl("nccl", ctx)
    norm = torch.nn.functional.normalize  # token-wise, like RMSNorm
    out = {
        "ar": impl.matmul_all_reduce(x_r.reshape(2, M // 2, kr), w_r, add=add_r.reshape(2, M // 2, -1),
                                     residual=p["res"].reshape(2, M // 2, -1)).reshape(M, -1),
        "rs": impl.matmul_reduce_scatter(x_r.contiguous(), w_r, add=add_r, residual=p["res"][rows]),
        "ag": impl.all_gather_matmul(x_shard, w_c, prologue=norm, return_gathered=True),
        "ref_ar": gar.reference(x_r, w_r, ctx.group, add=add_r, residual=p["res"]),
        "ref_rs": mrs.reference(x_r, w_r, ctx.group, R, add=add_r, residual=p["res"][rows]),
        "ref_ag": agm.reference(x_shard, w_c, ctx.group, R, prologue=norm),
        "ref_sum": one_shot.reference_all_reduce(p["res"] * (r + 1), ctx.group),
        "ref_gather": one_shot.reference_all_gather(x_shard, ctx.group, R),
        "plain": (impl.all_reduce(torch.ones(3) * (r + 1)), impl.reduce_scatter(torch.arange(4.0 * R).view(2 * R, 2)),
                  impl.all_gather(torch.full((1, 2), float(r)))),
    }
    return out


def test_ops_on_two_gloo_ranks_match_the_unsharded_math(tmp_path):
    R = 2
    results = spawn_ranks(_ops_on_rank, R, tmp_path, timeout_s=120)
    p = _full_problem(R)
    M, K = p["x"].shape
    y = p["x"] @ p["w_row"].T + p["adds"].sum(0) + p["res"]  # (M, N): what every rank must hold
    col = torch.nn.functional.normalize(p["x"]) @ p["w_col"].T  # (M, N_c)
    nc, mr = p["w_col"].shape[0] // R, M // R
    for r, out in enumerate(results):
        for key in ("ar", "ref_ar"):
            torch.testing.assert_close(out[key], y, atol=FP32_TOL, rtol=FP32_TOL)
        for key in ("rs", "ref_rs"):
            torch.testing.assert_close(out[key], y[r * mr:(r + 1) * mr], atol=FP32_TOL, rtol=FP32_TOL)
        ag_out, gathered = out["ag"]
        torch.testing.assert_close(gathered, p["x"])
        for val in (ag_out, out["ref_ag"]):
            torch.testing.assert_close(val, col[:, r * nc:(r + 1) * nc], atol=FP32_TOL, rtol=FP32_TOL)
        torch.testing.assert_close(out["ref_sum"], p["res"] * 3)
        torch.testing.assert_close(out["ref_gather"], p["x"])
        ar, rs, ag = out["plain"]
        torch.testing.assert_close(ar, torch.full((3,), 3.0))
        torch.testing.assert_close(rs, 2 * torch.arange(8.0).view(4, 2)[r * 2:(r + 1) * 2])
        torch.testing.assert_close(ag, torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
