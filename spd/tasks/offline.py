"""Loaders that the task YAMLs call through `custom_dataset: !function offline.load`.

lm-eval calls a task's custom_dataset with the task's metadata and dataset_kwargs as keyword arguments
and expects a datasets.DatasetDict. The data folder is chosen, first match wins, by
  1. metadata key `spd_data_dir` (TaskManager(metadata=...) or lm-eval's `--metadata`),
  2. the environment variable SPD_DATA_DIR,
  3. spd.config.assets_dir() / "data" ($SPD_ASSETS, else ../shared/assets beside the project),
so no YAML names a machine's path. Files are read with json, not datasets.load_dataset: nothing is
cached on disk and nothing can reach for the network.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import datasets

DATA_DIR_ENV = "SPD_DATA_DIR"
DATA_DIR_KEY = "spd_data_dir"

# A paragraph's last word, then only closing punctuation or quotes: (context) (word) (tail).
_LAST_WORD = re.compile(r"^(?P<context>.*\S)\s+(?P<word>[A-Za-z]+)[^\w\s]*$", re.DOTALL)
CLOZE_MIN_CONTEXT_WORDS = 5  # shorter paragraphs ("Spot.") leave nothing to predict the word from


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """The folder of offline JSON-lines data: override, else $SPD_DATA_DIR, else assets_dir()/data."""
    if override:
        return Path(override).expanduser()
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser()
    from spd.config import assets_dir

    return assets_dir() / "data"


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load(data_file: str, split: str = "test", **metadata) -> datasets.DatasetDict:
    """One JSON-lines file of the data folder as a DatasetDict with a single split named `split`.

    Other keyword arguments are the task's metadata (version, the model's arguments...); only
    `spd_data_dir` is read from them.
    """
    folder = data_dir(metadata.get(DATA_DIR_KEY))
    path = folder / data_file
    if not path.is_file():
        raise FileNotFoundError(
            f"offline task data {path} does not exist; set ${DATA_DIR_ENV} (or the task metadata "
            f"key {DATA_DIR_KEY!r}, or $SPD_ASSETS) to the folder holding {data_file}"
        )
    return datasets.DatasetDict({split: datasets.Dataset.from_list(read_jsonl(path))})


def split_last_word(text: str) -> tuple[str, str] | None:
    """(context, " word") for a paragraph ending in an alphabetic word plus punctuation, else None."""
    m = _LAST_WORD.match(text.strip())
    if m is None or len(m["context"].split()) < CLOZE_MIN_CONTEXT_WORDS:
        return None
    return m["context"], " " + m["word"]


def cloze_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """process_docs of spd_tinystories_cloze: keep paragraphs with a usable last word, add context/target."""
    rows = []
    for doc in dataset:
        pair = split_last_word(doc["text"])
        if pair is not None:
            rows.append({**doc, "context": pair[0], "target": pair[1]})
    return datasets.Dataset.from_list(rows)


# The asset's HellaSwag `query` is "activity_label: ctx_a ctx_b" with ctx_b as it is in the data set; lm-eval
# builds it from ctx_a + " " + ctx_b.capitalize(). The split point is not in the asset: ctx_b is taken to be
# the text after the last sentence end (". ", "! ", "? ") when that text starts with a lower-case letter,
# which is how ActivityNet items end ("... on a roof. he"). str.capitalize() then gives lm-eval's form.
_CTX_B = re.compile(r"(?<=[.!?] )(?P<ctx_b>[a-z][^.!?]*)$")


def hellaswag_query(query: str) -> str:
    """lm-eval's HellaSwag query recovered from the asset's: ctx_b capitalised, then lm-eval's preprocess."""
    from lm_eval.tasks.hellaswag.utils import preprocess

    return preprocess(_CTX_B.sub(lambda m: m["ctx_b"].capitalize(), query))


def hellaswag_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """process_docs of spd_hellaswag: lm-eval's preprocess on query and choices (bracket spans, spaces), ctx_b
    capitalised as recovered by hellaswag_query; `gold` as lm-eval's process_docs sets it."""
    from lm_eval.tasks.hellaswag.utils import preprocess

    def one(doc):
        return {"query": hellaswag_query(doc["query"]), "choices": [preprocess(c) for c in doc["choices"]],
                "gold": int(doc["label"])}

    return dataset.map(one)
