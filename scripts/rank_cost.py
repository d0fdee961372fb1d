"""One spd.rank-cost/1 record (JSON line) from an spd-rank run directory: the ranking's own cost (its steps,
from sensitivity.json) and the command's wall time (load, calibration, capture, baseline and steps).

    python scripts/rank_cost.py RUN_DIR --wall SECONDS --command "spd-rank ..." >> docs/benchmarks/rank_cost.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spd.run import meta  # noqa: E402


def record(run_dir: Path, wall: float, command: str) -> dict:
    r = json.loads((run_dir / "sensitivity.json").read_text())
    return {"schema": "spd.rank-cost/1", "model": r["settings"]["model"], "tp": r["tp"], "method": r["method"],
            "calibration": f"{r['calibration']['num_samples']}x{r['calibration']['seq_len']} ({r['calibration']['data']})",
            "wall_seconds": round(wall, 2), "steps_seconds": round(r["seconds_total"], 2), **r["cost"],
            "order": r["order"], "command": command, **meta(stage="rank-cost")}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--wall", type=float, required=True)
    p.add_argument("--command", required=True)
    a = p.parse_args()
    print(json.dumps(record(a.run_dir, a.wall, a.command)))
