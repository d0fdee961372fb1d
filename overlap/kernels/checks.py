"""Argument checks shared by every fused GEMM + collective entry point, and the errors they raise.

Each check names what was wrong and what would be right, in the caller's terms (x, w, add, residual):

    x (M, K) @ w.T with w an nn.Linear weight (N, K)  ->  (M, N)

Weights are always in nn.Linear layout (out_features, in_features), as overlap.tp stores them; the
ops multiply by w.T without copying it.
"""

from __future__ import annotations

import torch

from spd.errors import SPDError


class KernelArgError(SPDError):
    """A tensor handed to a fused GEMM + collective op has the wrong shape, dtype, device or layout."""


class KernelUnavailableError(RuntimeError):
    """The requested implementation cannot run here (no CUDA, too few ranks, a torch API missing)."""


def check_matmul(x: torch.Tensor, w: torch.Tensor, op: str, x_name: str = "x") -> tuple[int, int, int]:
    """(M, N, K) of x (M, K) @ w.T for w (N, K); raises KernelArgError naming the bad argument."""
    if x.dim() != 2:
        raise KernelArgError(f"{op}: {x_name} must be 2-D (tokens, features), got shape {tuple(x.shape)}; "
                             f"flatten the leading dimensions first ({x_name}.flatten(0, -2))")
    if w.dim() != 2:
        raise KernelArgError(f"{op}: w must be a 2-D nn.Linear weight (out_features, in_features), "
                             f"got shape {tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise KernelArgError(f"{op}: {x_name} has {x.shape[1]} features but w (out, in) = {tuple(w.shape)} "
                             f"expects in_features = {w.shape[1]}; pass the nn.Linear weight, not its transpose")
    if x.dtype != w.dtype:
        raise KernelArgError(f"{op}: {x_name} is {x.dtype} but w is {w.dtype}; cast one of them")
    if x.device != w.device:
        raise KernelArgError(f"{op}: {x_name} is on {x.device} but w is on {w.device}")
    if w.stride(1) != 1:
        raise KernelArgError(f"{op}: w must be row-major with contiguous rows (stride {w.stride()}); "
                             f"pass w.contiguous()")
    return x.shape[0], w.shape[0], x.shape[1]


def check_addend(t: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor, op: str,
                 name: str) -> torch.Tensor | None:
    """t itself (contiguous) when it has exactly `shape`, like's dtype and device; None passes through."""
    if t is None:
        return None
    if tuple(t.shape) != tuple(shape):
        raise KernelArgError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != like.dtype or t.device != like.device:
        raise KernelArgError(f"{op}: {name} must be {like.dtype} on {like.device}, got {t.dtype} on {t.device}")
    return t.contiguous()


def check_rows_divisible(m: int, world: int, op: str) -> int:
    """m // world; raises when the token count does not split evenly over the ranks."""
    if m % world:
        lo, hi = m - m % world, m - m % world + world
        raise KernelArgError(f"{op}: {m} rows do not split evenly over {world} ranks; pad the token count "
                             f"to a multiple of {world} (for example {hi}) or use {lo or world}")
    return m // world


def check_decode_rows(m: int, max_m: int, op: str) -> None:
    if not 1 <= m <= max_m:
        raise KernelArgError(f"{op}: the fused decode kernel handles 1..{max_m} rows, got {m}; "
                             f"larger M takes the one-shot or pipelined path")


def check_dtype(t: torch.Tensor, allowed: tuple[torch.dtype, ...], op: str, name: str = "x") -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise KernelArgError(f"{op}: {name} is {t.dtype}; supported dtypes: {names}")
