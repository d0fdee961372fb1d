"""The SPD plan: which blocks drop their attention all-reduce at degree R, with each block's tier.

Tiers (paper): ISB = insensitive (zero-shot SPD), SB = sensitive (zero-shot + block-to-block
distillation), ESB = extremely sensitive (head grouping, then distillation). head_perm[i], when set, is
the query-head order applied to block i by head grouping (new head j = old head head_perm[i][j]). Every
stage reads and writes this one JSON format (schema "spd.plan/1").
"""

from __future__ import annotations

import json
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
        for i in self.head_perm:
            if i not in self.tiers:
                raise PlanError(f"head_perm given for block {i}, which is not an SPD block of the plan")

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

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "model": self.model,
            "tp": self.tp,
            "num_layers": self.num_layers,
            "blocks": self.blocks,
            "tiers": {str(i): t for i, t in sorted(self.tiers.items())},
            "head_perm": {str(i): list(p) for i, p in sorted(self.head_perm.items())},
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "SPDPlan":
        if d.get("schema") != SCHEMA:
            raise PlanError(f"not an SPD plan: schema is {d.get('schema')!r}, expected {SCHEMA!r}")
        try:
            return cls(
                tp=int(d["tp"]),
                num_layers=int(d["num_layers"]),
                tiers={int(i): t for i, t in d.get("tiers", {}).items()},
                head_perm={int(i): [int(h) for h in p] for i, p in d.get("head_perm", {}).items()},
                model=d.get("model", ""),
                source=d.get("source", {}),
            )
        except KeyError as e:
            raise PlanError(f"SPD plan is missing the field {e.args[0]!r}") from None

    def save(self, path: str | Path) -> Path:
        from spd.run import write_json_atomic

        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "SPDPlan":
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"SPD plan file {path} does not exist; make one with spd-rank (it writes plan.json)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"SPD plan file {path} is not valid JSON ({e})") from None
        return cls.from_dict(d)
