"""Markdown tables from spd-bench records: python scripts/bench_table.py FILE.jsonl [...] [-o out.md]."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable without installing the project

from overlap.bench_table import main  # noqa: E402

if __name__ == "__main__":
    main()
