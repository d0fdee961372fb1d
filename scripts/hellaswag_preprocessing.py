"""What lm-eval's HellaSwag preprocessing changes on the offline asset: accuracy with and without it.

    python scripts/hellaswag_preprocessing.py [--model smollm2_135m] [--limit 1000] [--out FILE.json]

Evaluates spd_hellaswag twice on the same documents with the same model: as shipped (process_docs:
offline.hellaswag_docs, lm-eval's preprocess + ctx_b capitalisation) and on the asset's text as it is (the
same task with process_docs removed). Prints both and writes them, with meta, to --out.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from spd.config import EvalConfig
from spd.load import load_model, model_config_by_name
from spd.run import meta, write_json_atomic
from spd.tasks import TASKS_DIR


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default="docs/results/hellaswag_preprocessing.json")
    a = ap.parse_args()

    from spd.evaluate import evaluate

    model, tok = load_model(model_config_by_name(a.model))
    raw_dir = Path(tempfile.mkdtemp())
    shutil.copy(TASKS_DIR / "offline.py", raw_dir)
    text = (TASKS_DIR / "spd_hellaswag.yaml").read_text().replace("task: spd_hellaswag", "task: spd_hellaswag_asset")
    (raw_dir / "spd_hellaswag_asset.yaml").write_text(
        "\n".join(line for line in text.splitlines() if not line.startswith("process_docs")) + "\n")
    out = {}
    for name, include in (("spd_hellaswag", None), ("spd_hellaswag_asset", str(raw_dir))):
        cfg = EvalConfig(tasks=[name], include_path=include, limit=a.limit, batch_size=a.batch_size)
        res = evaluate(model, tok, cfg, Path(tempfile.mkdtemp()), is_writer=False)["results"][name]
        out[name] = {k.split(",")[0]: v for k, v in res.items() if k != "alias"}
    shutil.rmtree(raw_dir)
    record = {"schema": "spd.hellaswag-preprocessing/1", "model": a.model, "limit": a.limit, "results": out,
              "command": f"python scripts/hellaswag_preprocessing.py --model {a.model} --limit {a.limit}",
              "meta": meta()}
    write_json_atomic(a.out, record)
    for name, r in out.items():
        print(f"{name:22s} acc {r['acc']:.4f} +- {r['acc_stderr']:.4f}   acc_norm {r['acc_norm']:.4f} "
              f"+- {r['acc_norm_stderr']:.4f}")
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
