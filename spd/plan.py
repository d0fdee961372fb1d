"""The SPD plan: which blocks drop their attention all-reduce at degree R, with each block's tier.

Tiers (paper): ISB = insensitive (zero-shot SPD), SB = sensitive (zero-shot + block-to-block
distillation), ESB = extremely sensitive (head grouping, then distillation). head_perm[i], when set, is
the query-head order applied to block i by head grouping (new head j = old head head_perm[i][j]).
weights[i], when set, names block i's whole state after head grouping and distillation: a safetensors file
and its sha256 (heads already in head_perm order). A plan file stores these paths relative to its own
folder. spd.surgery.apply_plan_ is the one way to put a plan on a model. Every stage reads and writes this
one JSON format (schema "spd.plan/1").
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from spd.errors import PlanError

SCHEMA = "spd.plan/1"
TIERS = ("ISB", "SB", "ESB")


@dataclass(frozen=True)
class SPDPlan:
    tp: int
    num_layers: int
    tiers: dict[int, str] = field(default_factory=dict)  # SPD block index -> tier
    head_perm: dict[int, list[int]] = field(default_factory=dict)
    weights: dict[int, dict] = field(default_factory=dict)  # block -> {"file": path, "sha256": hex}
    model: str = ""
    source: dict = field(default_factory=dict)  # provenance: ranking file, rule, thresholds

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise PlanError(f"plan tp must be >= 1, got {self.tp}")
        for i, tier in self.tiers.items():
            if not 0 <= i < self.num_layers:
                raise PlanError(f"plan names block {i}, but the model has blocks 0..{self.num_layers - 1}")
            if tier not in TIERS:
                raise PlanError(f"block {i} has tier {tier!r}; valid tiers: {', '.join(TIERS)}")
        for name, blocks in (("head_perm", self.head_perm), ("weights", self.weights)):
            for i in blocks:
                if i not in self.tiers:
                    raise PlanError(f"{name} given for block {i}, which is not an SPD block of the plan")
        for i, ref in self.weights.items():
            if not isinstance(ref, dict) or not ref.get("file") or not ref.get("sha256"):
                raise PlanError(f"weights of block {i} must be {{'file': PATH, 'sha256': HEX}}, got {ref!r}")

    @property
    def blocks(self) -> list[int]:
        return sorted(self.tiers)

    def blocks_in(self, *tiers: str) -> list[int]:
        return [i for i in self.blocks if self.tiers[i] in tiers]

    @property
    def fraction(self) -> float:
        return len(self.tiers) / self.num_layers

    @classmethod
    def zero_shot(cls, tp: int, num_layers: int, blocks, model: str = "") -> "SPDPlan":
        """Every listed block as ISB (zero-shot SPD)."""
        return cls(tp=tp, num_layers=num_layers, tiers={int(i): "ISB" for i in blocks}, model=model)

    def identity(self) -> dict:
        """What the plan does to a model's numbers (no paths, no provenance): tiers, R, heads, weight hashes."""
        return {"tp": self.tp, "num_layers": self.num_layers,
                "tiers": {str(i): t for i, t in sorted(self.tiers.items())},
                "head_perm": {str(i): list(p) for i, p in sorted(self.head_perm.items())},
                "weights": {str(i): w["sha256"] for i, w in sorted(self.weights.items())}}

    def to_dict(self, base: str | Path | None = None) -> dict:
        """The JSON form; weight files relative to `base` (a folder) when given, else as they are."""
        def where(f: str) -> str:
            return os.path.relpath(Path(f).resolve(), Path(base).resolve()) if base is not None else str(f)

        return {
            "schema": SCHEMA,
            "model": self.model,
            "tp": self.tp,
            "num_layers": self.num_layers,
            "blocks": self.blocks,
            "tiers": {str(i): t for i, t in sorted(self.tiers.items())},
            "head_perm": {str(i): list(p) for i, p in sorted(self.head_perm.items())},
            "weights": {str(i): {"file": where(w["file"]), "sha256": w["sha256"]}
                        for i, w in sorted(self.weights.items())},
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: dict, base: str | Path | None = None) -> "SPDPlan":
        """A plan from its JSON form; relative weight files resolve against `base` (the plan file's folder)."""
        if d.get("schema") != SCHEMA:
            raise PlanError(f"not an SPD plan: schema is {d.get('schema')!r}, expected {SCHEMA!r}")
        try:
            return cls(
                tp=int(d["tp"]),
                num_layers=int(d["num_layers"]),
                tiers={int(i): t for i, t in d.get("tiers", {}).items()},
                head_perm={int(i): [int(h) for h in p] for i, p in d.get("head_perm", {}).items()},
                weights={int(i): {"file": str(Path(base, w["file"]) if base is not None else w["file"]),
                                  "sha256": w["sha256"]} for i, w in d.get("weights", {}).items()},
                model=d.get("model", ""),
                source=d.get("source", {}),
            )
        except KeyError as e:
            raise PlanError(f"SPD plan is missing the field {e.args[0]!r}") from None

    def save(self, path: str | Path) -> Path:
        from spd.run import write_json_atomic

        return write_json_atomic(path, self.to_dict(base=Path(path).parent))

    @classmethod
    def load(cls, path: str | Path) -> "SPDPlan":
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"SPD plan file {path} does not exist; make one with spd-rank (it writes plan.json)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"SPD plan file {path} is not valid JSON ({e})") from None
        return cls.from_dict(d, base=path.parent)
