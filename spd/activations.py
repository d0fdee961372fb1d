"""Teacher activations: the original model's hidden states at chosen block boundaries, captured once.

With h_0 = embed(tokens) and h_{i+1} = block_i(h_i) in the UNMODIFIED model, block i's teacher pair is

    input  x_i = h_i          (N, L, D)
    target y_i = h_{i+1}      (N, L, D)   = original block_i(x_i), computed once by the capture forward

so block-to-block distillation never runs a teacher copy, and a hidden state shared by two neighbouring
blocks (the target of i is the input of i + 1) is stored once. The keyword arguments the model passes to
its blocks (attention mask, RoPE cos/sin, position ids) are captured by a forward hook on the first
batch; calibration windows are all full length with no padding, so they are the same for every batch
(the mask is kept with batch size 1 and broadcasts). The forward stops after the last needed block.
States live in memory, or are spilled to one
safetensors file per capture batch in spill_dir (read back lazily, one hidden state at a time).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from spd.block import decoder_layers
from spd.placement import input_device

BLOCK_KWARGS = ("attention_mask", "position_embeddings", "position_ids")  # what a block needs without a cache


class ActivationStore:
    """Hidden states h_i (N, L, D) for a set of indices i, in memory or spilled to disk."""

    def __init__(self, indices, spill_dir: str | Path | None = None, _reopen: bool = False):
        self.indices = sorted(set(indices))
        self.spill_dir = None if spill_dir is None else Path(spill_dir)
        self.kwargs: dict = {}
        self.persistent = _reopen
        self._chunks: dict[int, list[torch.Tensor]] = {i: [] for i in self.indices}
        self._files: list[Path] = sorted(self.spill_dir.glob("batch_*.safetensors")) if _reopen else []
        if self.spill_dir is not None and not _reopen:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.spill_dir.glob("batch_*.safetensors"):  # from an interrupted run
                stale.unlink()

    def add_batch(self, states: dict[int, torch.Tensor]) -> None:
        """One capture batch: {index: (B, L, D)}."""
        states = {i: s.detach().to("cpu").contiguous() for i, s in states.items()}
        if self.spill_dir is None:
            for i, s in states.items():
                self._chunks[i].append(s)
            return
        path = self.spill_dir / f"batch_{len(self._files):05d}.safetensors"
        save_file({f"h{i}": s for i, s in states.items()}, str(path))
        self._files.append(path)

    def get(self, index: int) -> torch.Tensor:
        """(N, L, D) hidden state h_index on the CPU."""
        if self.spill_dir is None:
            return torch.cat(self._chunks[index])
        parts = []
        for path in self._files:
            with safe_open(str(path), framework="pt") as f:
                parts.append(f.get_tensor(f"h{index}"))
        return torch.cat(parts)

    def persist(self) -> "ActivationStore":
        """Mark a spilled capture complete (kwargs saved, marker written last): reusable by reopen()."""
        torch.save(self.kwargs, self.spill_dir / "kwargs.pt")
        (self.spill_dir / "complete.json").write_text(json.dumps({"indices": self.indices, "files": len(self._files)}))
        self.persistent = True
        return self

    @classmethod
    def reopen(cls, spill_dir: str | Path) -> "ActivationStore | None":
        """A capture persisted in spill_dir, or None if there is none or it is incomplete."""
        d = Path(spill_dir)
        try:
            meta = json.loads((d / "complete.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
        store = cls(meta["indices"], d, _reopen=True)
        if len(store._files) != meta["files"]:
            return None
        store.kwargs = torch.load(d / "kwargs.pt", weights_only=False)
        return store

    def release(self, index: int) -> None:
        """Free h_index from memory once no remaining block needs it (spilled files stay until cleanup)."""
        self._chunks.pop(index, None)

    def cleanup(self) -> None:
        if self.persistent:  # shared by several runs: kept on disk
            self._chunks.clear()
            return
        for path in self._files:
            path.unlink(missing_ok=True)
        self._files.clear()
        self._chunks.clear()

    def block_kwargs(self, device=None, dtype: torch.dtype | None = None) -> dict:
        """The captured block kwargs, floating tensors cast to dtype (RoPE tables follow the block's dtype)."""

        def cast(v):
            if isinstance(v, torch.Tensor):
                v = v.to(device) if device is not None else v
                return v.to(dtype) if dtype is not None and v.is_floating_point() else v
            if isinstance(v, tuple):
                return tuple(cast(t) for t in v)
            return v

        return {k: cast(v) for k, v in self.kwargs.items()}


class _StopForward(Exception):
    """Raised by the capture hook after the last needed block: later blocks and the LM head are not run."""


def _first_batch_only(v):
    """A block kwarg with its batch dimension cut to 1 (the same mask for every unpadded window)."""
    if isinstance(v, torch.Tensor) and v.dim() == 4 and v.shape[0] > 1:
        return v[:1].clone()
    return v


@torch.no_grad()
def capture_hidden_states(model: nn.Module, tokens: torch.Tensor, blocks, batch_size: int = 4,
                          spill_dir: str | Path | None = None, progress: bool = True,
                          inputs_only: bool = False) -> ActivationStore:
    """Inputs and outputs of `blocks` in the model as it is now (call on the unmodified model).

    tokens: (N, L) calibration windows. Returns a store holding h_i and h_{i+1} for every i in blocks
    (with inputs_only, h_i only).
    """
    layers = decoder_layers(model)
    blocks = sorted(set(int(b) for b in blocks))
    store = ActivationStore([i for b in blocks for i in ((b,) if inputs_only else (b, b + 1))], spill_dir)
    batch: dict[int, torch.Tensor] = {}

    def hook(i):
        def fn(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            batch[i] = x  # (B, L, D)
            if not inputs_only:
                batch[i + 1] = out
            if not store.kwargs:
                store.kwargs = {k: _first_batch_only(kwargs[k]) for k in BLOCK_KWARGS if k in kwargs}
            if i == blocks[-1]:
                raise _StopForward

        return fn

    handles = [layers[b].register_forward_hook(hook(b), with_kwargs=True) for b in blocks]
    device = input_device(model)
    inner = getattr(model, "model", model)  # the decoder stack only: no LM head
    try:
        for s in tqdm(range(0, len(tokens), batch_size), desc="capture", disable=not progress, leave=False):
            batch.clear()
            try:
                inner(input_ids=tokens[s:s + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
            store.add_batch(dict(batch))
    finally:
        for h in handles:  # hooks are for capture only: the model is returned as it came
            h.remove()
    return store


def state_bytes(num_samples: int, seq_len: int, hidden: int, blocks, dtype=torch.float32) -> int:
    """Bytes an in-memory capture of `blocks` would take (to decide whether to spill)."""
    indices = {i for b in blocks for i in (b, b + 1)}
    return len(indices) * num_samples * seq_len * hidden * torch.empty(0, dtype=dtype).element_size()
