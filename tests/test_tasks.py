"""Each offline task YAML loads through lm-eval's TaskManager and reads its documents from the data folder."""

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from lm_eval.tasks import TaskManager

from spd.config import EvalConfig
from spd.evaluate import task_manager
from spd.tasks import TASKS_DIR
from spd.tasks.offline import DATA_DIR_ENV, DATA_DIR_KEY, data_dir, load, read_jsonl, split_last_word

# task -> (data file, number of documents or None when process_docs filters, output type)
TASKS = {
    "spd_hellaswag": ("hellaswag_val.jsonl", 10042, "multiple_choice"),
    "spd_piqa": ("piqa_valid.jsonl", 1838, "multiple_choice"),
    "spd_arc_easy": ("arc_easy_test.jsonl", 2376, "multiple_choice"),
    "spd_arc_challenge": ("arc_challenge_test.jsonl", 1172, "multiple_choice"),
    "spd_lambada": ("lambada_test.jsonl", 5153, "loglikelihood"),
    "spd_wikitext": ("wikitext2_test.jsonl", 62, "loglikelihood_rolling"),
    "spd_tinystories": ("tinystories_val.jsonl", 4300, "loglikelihood_rolling"),
    "spd_tinystories_cloze": ("tinystories_val.jsonl", None, "loglikelihood"),
}
PAPER_TASKS = ["spd_arc_easy", "spd_arc_challenge", "spd_hellaswag", "spd_lambada", "spd_piqa"]
LIMIT = 5


@pytest.fixture(scope="module")
def tm():
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def test_index_lists_the_suite(tm):
    assert set(TASKS) <= set(tm.all_subtasks)
    assert "spd_offline" in tm.all_groups


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_reads_offline_docs(tm, name):
    file, n_docs, output_type = TASKS[name]
    task = tm.load([name])["tasks"][name]
    assert task.OUTPUT_TYPE == output_type
    docs = task.eval_docs
    assert len(docs) == (n_docs or len(docs)) and len(docs) > 0
    task.build_all_requests(limit=LIMIT)
    assert len({inst.doc_id for inst in task.instances}) == LIMIT
    raw = read_jsonl(data_dir() / file)[0]
    doc = docs[0]
    if output_type == "multiple_choice":
        choices, gold = task.doc_to_choice(doc), task.doc_to_target(doc)
        assert isinstance(gold, int) and 0 <= gold < len(choices)
        assert all(inst.args[1].startswith(" ") for inst in task.instances)  # target_delimiter " "
    elif output_type == "loglikelihood":
        ctx, target = task.instances[0].args
        assert target.startswith(" ") and " " not in target[1:] and ctx
    else:
        assert task.instances[0].args[0].strip()
    if name == "spd_hellaswag":  # HellaSwag val[0]: ctx_a "A man is sitting on a roof.", ctx_b "he"
        assert raw["query"].endswith("roof. he") and task.doc_to_text(doc).endswith("roof. He")
        assert gold == raw["label"] == 3
    if name.startswith("spd_arc"):
        assert choices == raw["choices"]["text"] and "ABCDE"[gold] == raw["answerKey"]
    if name == "spd_piqa":
        assert task.doc_to_text(doc) == f"Question: {raw['goal']}\nAnswer:"
        assert choices == [raw["sol1"], raw["sol2"]]
    if name == "spd_lambada":
        assert ctx + target == raw["text"]
    if name == "spd_wikitext":
        assert " @-@ " in raw["page"] and " @-@ " not in task.instances[0].args[0]  # lm-eval's detokenizer


HELLASWAG_ORIGINALS = [  # documents in the Hugging Face data set's form (ctx_a, ctx_b split kept)
    {"activity_label": "Clean and jerk", "ctx_a": "A lady walks to a barbell. She bends down and grabs the pole.",
     "ctx_b": "the lady", "endings": ["swings and lands.", "stands and lifts [it] over her head."], "label": "1"},
    {"activity_label": "Family Life", "ctx_a": "How to entertain a toddler. Visit a site like [www.kiddio.org]  to "
     "find activities.", "ctx_b": "", "endings": ["Choose small, simple games.", "See [a guide | how to]."],
     "label": "0"},
    {"activity_label": "High jump", "ctx_a": "A boy is running down a track.", "ctx_b": "the boy",
     "endings": ["runs into a car.", "gets in a mat."], "label": "1"},
]


def test_hellaswag_docs_match_lm_evals_process_docs():
    """The asset's form (query = "label: ctx_a ctx_b" unprocessed) through our process_docs gives exactly what
    lm-eval's own process_docs gives for the original documents."""
    import datasets
    from lm_eval.tasks.hellaswag.utils import process_docs

    from spd.tasks.offline import hellaswag_docs

    theirs = process_docs(datasets.Dataset.from_list(HELLASWAG_ORIGINALS))
    asset = [{"query": f"{d['activity_label']}: {d['ctx_a']} {d['ctx_b']}".rstrip(), "choices": d["endings"],
              "label": int(d["label"])} for d in HELLASWAG_ORIGINALS]
    ours = hellaswag_docs(datasets.Dataset.from_list(asset))
    for a, b in zip(ours, theirs):
        assert (a["query"], a["choices"], a["gold"]) == (b["query"], b["choices"], b["gold"])
    assert "[" not in "".join(ours["query"]) and ours["query"][0].endswith("the pole. The lady")


def test_group_is_the_paper_tasks(tm):
    loaded = tm.load(["spd_offline"])
    assert loaded["group_map"]["spd_offline"] == PAPER_TASKS


def test_cloze_split():
    ctx, word = split_last_word('Tom said, "I like my new red ball very much!"')
    assert (ctx, word) == ('Tom said, "I like my new red ball very', " much")
    assert split_last_word("Spot.") is None
    assert split_last_word("They played with the ball until it was 5") is None


def test_data_dir_from_env_and_metadata(tmp_path, monkeypatch):
    (tmp_path / "piqa_valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b", "label": 1}\n')
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert len(load("piqa_valid.jsonl", split="validation")["validation"]) == 1
    task = TaskManager(include_path=str(TASKS_DIR), include_defaults=False).load(["spd_piqa"])["tasks"]["spd_piqa"]
    assert len(task.eval_docs) == 1
    monkeypatch.delenv(DATA_DIR_ENV)
    metadata = {DATA_DIR_KEY: str(tmp_path)}
    task = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata).load(["spd_piqa"])
    assert len(task["tasks"]["spd_piqa"].eval_docs) == 1
    with pytest.raises(FileNotFoundError, match=DATA_DIR_ENV):
        load("missing.jsonl", **metadata)


def test_offline_names_skip_the_builtin_index():
    tm_, offline = task_manager(EvalConfig(tasks=["spd_offline", "spd_tinystories"]))
    assert offline and "hellaswag" not in tm_.all_tasks


def test_standard_names_resolve_by_configuration_alone():
    """eval.tasks=[hellaswag, piqa] with eval.include_path unset: lm-eval's own tasks (read online)."""
    tm_, offline = task_manager(EvalConfig(tasks=["hellaswag", "piqa", "spd_lambada"]))
    assert not offline and {"hellaswag", "piqa", "spd_lambada"} <= set(tm_.all_tasks)
