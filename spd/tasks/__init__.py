"""The offline lm-eval task suite: YAML task configs beside the small loader they call (offline.py).

Point lm-eval's TaskManager (or `--include_path`) at TASKS_DIR. docs/tasks.md lists the tasks and
how each differs from lm-eval's official definition.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
