"""spd-bench: resolve the Hydra config, then start one torchrun job for this (R, interconnect).

    spd-bench parallel.tp=4                                  # conf/bench.yaml: LLaMA-2-70B shape, NVLink
    spd-bench parallel.tp=4 parallel=nop2p                   # NCCL peer-to-peer disabled
    spd-bench parallel.tp=4 bench.impl=triton              # fused GEMM + all-reduce (overlap.kernels)
    spd-bench -m parallel.tp=1,2,4 parallel=default,nop2p    # a sweep: each job starts its own torchrun
    python -m overlap.cli model=tiny bench=smoke parallel.tp=2   # CPU smoke run (gloo), no install needed

Hydra runs only here, in one process; the ranks read the resolved config from job.json (the robust way
to combine Hydra with multi-GPU jobs). The child environment always keeps NVLink multicast off
(NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1); interconnect nop2p
adds NCCL_P2P_DISABLE=1 (the paper's low-bandwidth case), nvlink removes it.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from overlap.bench import check_impl, check_variants, check_virtual
from overlap.context import NO_MULTICAST
from overlap.model import ModelArgs
from overlap.tp import layout_of
from spd.cli import hydra_app
from spd.errors import ParallelConfigError, SPDError
from spd.run import PROJECT_ROOT, start_run, to_plain, write_json_atomic

INTERCONNECTS = ("nvlink", "nop2p")


def child_env(interconnect: str) -> dict[str, str]:
    """The environment of the torchrun job: multicast off always; peer-to-peer off for nop2p."""
    if interconnect not in INTERCONNECTS:
        raise ParallelConfigError(f"unknown interconnect {interconnect!r}; valid: {', '.join(INTERCONNECTS)}")
    env = dict(os.environ, **NO_MULTICAST)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
    if interconnect == "nop2p":
        env["NCCL_P2P_DISABLE"] = "1"
    else:
        env.pop("NCCL_P2P_DISABLE", None)
    return env


def check_devices(tp: int, backend: str) -> None:
    import torch

    if tp < 1:
        raise ParallelConfigError(f"parallel.tp must be >= 1, got {tp}")
    gpus = torch.cuda.device_count()
    if backend in ("auto", "nccl") and gpus and tp > gpus:
        raise ParallelConfigError(f"parallel.tp={tp} needs {tp} GPUs but {gpus} are visible; use parallel.tp<={gpus}")
    if backend == "nccl" and not gpus:
        raise ParallelConfigError("parallel.backend=nccl needs CUDA GPUs; use parallel.backend=gloo (or auto) on CPU")


def bench_job(cfg) -> dict:
    """The plain-JSON job every rank reads: model shape, bench settings, interconnect, output path."""
    b = cfg.bench
    check_variants(b.variants)
    if cfg.model.source != "random":
        print(f"note: spd-bench times random weights of {cfg.model.name}'s shape (model.source is ignored)")
    job = dict(
        model=to_plain(cfg.model), bench=to_plain(b), tp=cfg.parallel.tp, backend=cfg.parallel.backend,
        # A relative path stays relative (to the directory the job runs in), so a job file written here
        # also runs from the repository root of another machine.
        interconnect=cfg.parallel.interconnect, out=str(Path(b.out).expanduser()), cuda_graphs=bool(b.cuda_graphs),
        compile=b.compile, timeout_s=float(b.timeout_s), impl=check_impl(b.impl, b.variants), fuse=b.fuse,
        iso_ctas=_int_list(b.iso_ctas, "iso_ctas"), iso_sm_carveout=_int_list(b.iso_sm_carveout, "iso_sm_carveout"),
        decode_kernel=b.decode_kernel, norm_gemv=b.norm_gemv, triton_gemv=b.triton_gemv, swiglu_gemv=b.swiglu_gemv,
        pdl=b.pdl, stream_gemv=b.stream_gemv,
        prefill_graphs=b.prefill_graphs, virtual_tp=int(b.virtual_tp),
        command="spd-bench " + " ".join(shlex.quote(a) for a in sys.argv[1:]),  # the overrides, for the records
    )
    check_virtual(job)
    # The shard layout fits the shape (else: which degrees do), checked here rather than inside the torchrun job.
    layout_of(ModelArgs.from_model_config(job["model"]), max(job["tp"], job["virtual_tp"]))
    return job


def _int_list(value, name: str) -> list:
    """A bench.<name> setting as a list of ints or None (null: the default setting), validated."""
    if value is None:
        return [None]
    items = list(value) if not isinstance(value, (int, str)) else [value]
    try:
        return [None if v in (None, "null") else int(v) for v in items]
    except (TypeError, ValueError):
        raise SPDError(f"bench.{name} must be an int or a list of ints (null for the default), got {value!r}") from None


def launch(job: dict, run_dir: Path, timeout_s: float | None = None, dry_run: bool = False) -> None:
    """Write job.json into run_dir and run the torchrun job to completion (raises on failure).

    dry_run: only write job.json and print the command (for a machine without Hydra: the worker needs
    only torch; set the NCCL variables of child_env yourself there).
    """
    path = write_json_atomic(run_dir / "job.json", job)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={job['tp']}",
           "-m", "overlap.bench", "--job", str(path)]
    print("[spd-bench] " + " ".join(cmd), flush=True)
    if dry_run:
        return
    done = subprocess.run(cmd, env=child_env(job["interconnect"]), timeout=timeout_s)
    if done.returncode != 0:
        raise SPDError(f"the benchmark job failed (exit {done.returncode}); its ranks' output is above; "
                       f"job file: {path}")


def run_bench(cfg) -> Path:
    """spd-bench for one resolved RunApp: run directory (config.yaml, meta.json, job.json), then the job."""
    check_devices(cfg.parallel.tp, cfg.parallel.backend)
    job = bench_job(cfg)
    run_dir = start_run(Path(cfg.run_dir), cfg, stage="bench", tp=cfg.parallel.tp,
                        interconnect=cfg.parallel.interconnect)
    launch(job, run_dir, cfg.bench.job_timeout_s, dry_run=cfg.bench.dry_run)
    if not cfg.bench.dry_run:
        print(f"[spd-bench] records appended to {job['out']}")
    return run_dir


@hydra_app("bench")
def bench(cfg) -> None:
    """spd-bench: prefill/decode latency of base, SPD shares, nocomm (and hf_tp) at one (R, interconnect)."""
    run_bench(cfg)


if __name__ == "__main__":
    bench()
