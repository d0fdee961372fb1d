"""Artifacts keyed by what they depend on, and shared artifacts computed once.

Every stage artifact records

    settings   hash of every setting that can change it (model source and checksum, R, calibration, ranking,
               plan rule, distillation and head-grouping settings, evaluation tasks and limits...), upstream
               stages' settings included: computable from the config alone, before any work
    key        hash of the settings plus the exact plan the numbers were measured with (tiers, head
               permutations, sha256 of each distilled block)

A re-run first deletes every artifact whose settings differ from the config's (so config.yaml never sits
beside an artifact made with other settings, even if the run is interrupted later), then reuses an
artifact only when its key matches. Files and directories appear whole or not at all (written to a
temporary name, then renamed), so an interrupted stage leaves nothing a re-run would take for a result.
Work shared by the jobs of a sweep is done under a file lock: the first job computes, the others wait
and reuse it, under any Hydra launcher.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from spd.run import read_json, user_mode

SMALL_FILE = 1 << 30  # files below this are hashed (sha256); larger ones are identified by size and mtime


def key_of(obj) -> str:
    """sha256 (16 hex digits) of obj's canonical JSON (dataclasses as dicts, keys sorted)."""
    def plain(o):
        return asdict(o) if is_dataclass(o) else str(o)

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=plain).encode()).hexdigest()[:16]


def file_fingerprint(path: str | Path) -> dict:
    """sha256 of a file below SMALL_FILE bytes, else its size and modification time."""
    path = Path(path)
    st = path.stat()
    if st.st_size < SMALL_FILE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        return {"name": path.name, "sha256": h.hexdigest()}
    return {"name": path.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def model_fingerprint(cfg, model=None) -> dict:
    """What identifies a model's weights (cfg: spd.config.ModelConfig; model: the loaded model, if any).

    random: the shape fields and seed; gguf: the configured sha256 (checked on load), else the file's
    fingerprint; llama2c: the files' fingerprints; hf: a local directory's config and weight files, a hub
    id's resolved commit (config._commit_hash) and revision. The dtype and a float32 matmul precision other than
    `highest` are part of it; the device is not.
    """
    from spd.load import resolve_path

    out = {"source": cfg.source, "dtype": cfg.dtype}
    if cfg.matmul_precision != "highest":  # TF32 / bf16 matmuls change every number
        out["matmul_precision"] = cfg.matmul_precision
    if cfg.source == "random":
        fields = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size",
                  "max_position_embeddings", "rope_theta", "rms_norm_eps", "tie_word_embeddings", "seed")
        return out | {f: getattr(cfg, f) for f in fields} | {"init": 2}  # 2: drawn per module (spd.load.random_model)
    if cfg.source == "gguf":
        if cfg.sha256:
            return out | {"sha256": cfg.sha256}
        file = resolve_path(cfg.path)
        file = file / cfg.gguf_file if file.is_dir() and cfg.gguf_file else file
        return out | {"file": file_fingerprint(file)}
    if cfg.source == "llama2c":
        return out | {"files": [file_fingerprint(resolve_path(p)) for p in (cfg.path, cfg.tokenizer)]}
    local = resolve_path(cfg.path)
    if local.is_dir():
        files = sorted(p for p in local.iterdir() if p.suffix in (".json", ".safetensors", ".bin", ".model"))
        return out | {"files": [file_fingerprint(p) for p in files]}
    commit = getattr(getattr(model, "config", None), "_commit_hash", None)
    return out | {"hub_id": cfg.path, "revision": cfg.revision, "commit": commit}


def read_if(path: str | Path, key: str) -> dict | None:
    """The JSON artifact at path if it exists, parses and records this key, else None."""
    art = read_json(path)
    return art if isinstance(art, dict) and art.get("key") == key else None


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def purge_stale(job: Path, expected: dict[str, tuple[str, str]]) -> list[str]:
    """Delete the artifacts of `job` made with other settings; returns what was deleted.

    expected: artifact (a path relative to job) -> (marker file relative to job, settings hash). An artifact
    whose marker is missing, unreadable or records other settings is removed whole.
    """
    gone = []
    for rel, (marker, settings) in expected.items():
        path = job / rel
        if not path.exists():
            continue
        art = read_json(job / marker)
        if not isinstance(art, dict) or art.get("settings") != settings:
            remove(path)
            gone.append(rel)
    return gone


def _alive(pid: str) -> bool:
    """Whether pid (a temporary directory's owner on this host) is a running process; unparsable: no."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    return True


@contextmanager
def atomic_dir(final: str | Path):
    """Yield a temporary directory beside `final`; on success it replaces `final` whole. Temporaries of a run
    that died before it could clean up (named with their process id) are removed first."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a killed run (SIGTERM, SIGKILL, power)
        if not _alive(stale.name.removeprefix(f".{final.name}.tmp-").split("-")[0]):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-{os.getpid()}-"))
    os.chmod(tmp, user_mode(0o777))
    try:
        yield tmp
        if final.exists():
            remove(final)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def shared(path: str | Path, what: str):
    """Hold the lock of a shared artifact (path + ".lock") while it is read or computed.

    The first job of a parallel sweep computes; the others wait here, then find it done and reuse it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path) + ".lock")
    try:
        lock.acquire(timeout=1)
    except Timeout:
        print(f"waiting for another job computing the {what} in {path}")
        lock.acquire()
    try:
        yield path
    finally:
        lock.release()
