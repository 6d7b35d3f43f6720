"""The docstring task: items, the lm-eval task files, and the from-scratch scorer proved equal to the harness."""

import copy
import json
import math
import socket

import pytest
import yaml

from quantlesson import tasks
from quantlesson.errors import LessonError

N = 40  # items in the proof: a few seconds on two cores


@pytest.fixture
def offline(monkeypatch):
    """No network: the hub libraries are told so, and any attempt to connect fails and is recorded."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("no network in this test")

    for variable in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(variable, "1")
    import datasets.config  # read the variables at its first import, which an earlier test may have done without them

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield attempts
    assert attempts == [], f"something tried to reach the network: {attempts}"


# --- the items ------------------------------------------------------------------------------------


def test_items_are_deterministic_and_well_formed():
    items = tasks.docstring_items(n=N)
    assert items == tasks.docstring_items(n=N)
    assert items != tasks.docstring_items(n=N, seed=1)
    summaries = set(tasks._summaries("evaluation"))
    for item in items:
        assert set(item) == {"context", "choices", "label"}
        assert item["context"].startswith("# ") and item["context"].endswith("\ndef")
        assert len(item["choices"]) == len(set(item["choices"])) == 4
        right = item["choices"][item["label"]]
        summary = item["context"].removeprefix("# ").removesuffix("\ndef")
        assert (right, summary) in summaries  # the right name is the function this summary documents
        assert right not in summary  # the summary does not give the answer away
    assert len({item["context"] for item in items}) == N
    assert len({item["label"] for item in items}) == 4  # the right answer moves around
    assert len(tasks.docstring_items()) == len(summaries)  # n=None: every usable function once
    assert [len(item["choices"]) for item in tasks.docstring_items(n=3, choices=2)] == [2, 2, 2]


def test_no_other_choice_is_also_right():
    summaries = set(tasks._summaries("calibration"))  # this split documents some functions of two names alike
    assert len({summary for _, summary in summaries}) < len(summaries)
    for item in tasks.docstring_items("calibration"):
        summary = item["context"].removeprefix("# ").removesuffix("\ndef")
        assert [(choice, summary) in summaries for choice in item["choices"]].count(True) == 1


@pytest.mark.parametrize(
    ("kwargs", "advice"),
    [({"n": 0}, "at least one item"), ({"choices": 1}, "at least 2 choices"),
     ({"n": 10_000}, "ask for fewer items"), ({"choices": 10_000}, "ask for fewer choices")],
)  # fmt: skip
def test_bad_input_says_what_to_do(kwargs, advice):
    with pytest.raises(LessonError, match=advice):
        tasks.docstring_items(**kwargs)


def test_the_written_task_loads_back(tmp_path):
    items = tasks.docstring_items(n=5)
    path = tasks.write_task(tmp_path, items)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lesson_docstrings.jsonl", "lesson_docstrings.yaml"]
    config = yaml.safe_load(path.read_text())
    assert config["task"] == "lesson_docstrings" and config["output_type"] == "multiple_choice"
    data_file = config["dataset_kwargs"]["data_files"]["test"]
    assert data_file == str((tmp_path / "lesson_docstrings.jsonl").resolve())
    assert [json.loads(line) for line in open(data_file)] == items
    assert tasks.write_task(tmp_path, items) == path  # writing again replaces the files
    with pytest.raises(LessonError, match="docstring_items"):
        tasks.write_task(tmp_path, [])


def test_lm_eval_reads_the_task_offline(tmp_path, offline):
    from lm_eval.tasks import TaskManager

    items = tasks.docstring_items(n=5)
    tasks.write_task(tmp_path, items)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    task = manager.load("lesson_docstrings")["tasks"]["lesson_docstrings"]
    docs = list(task.test_docs())
    assert [task.doc_to_text(doc) for doc in docs] == [item["context"] for item in items]
    assert [task.doc_to_choice(doc) for doc in docs] == [item["choices"] for item in items]
    assert [task.doc_to_target(doc) for doc in docs] == [item["label"] for item in items]


# --- the proof: from scratch equals lm-evaluation-harness ------------------------------------------


def test_encode_pair_is_lm_evals(embedded):
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = embedded
    lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=1)  # a copy: HFLM sets a pad token
    for context, continuation in [("# Close the file.\ndef", " close"), ("x = 1  ", "+ 2"), ("def", " f\n")]:
        assert tasks.encode_pair(tokenizer, context, continuation) == lm._encode_pair(context, continuation)


def test_scratch_accuracy_equals_the_harness(embedded, tmp_path, offline):
    model, tokenizer = embedded
    items = tasks.docstring_items(n=N)
    tasks.write_task(tmp_path, items)
    assert tokenizer.pad_token is None  # the embedded tokenizer has none; the harness would set one

    harness = tasks.harness_accuracy(model, tokenizer, tmp_path)
    scratch = tasks.choice_log_likelihoods(model, tokenizer, items)

    assert tasks.accuracy(model, tokenizer, items) == harness["acc"]
    picks = [max(range(4), key=lls.__getitem__) for lls in harness["log_likelihoods"]]
    assert [max(range(4), key=lls.__getitem__) for lls in scratch] == picks  # item by item
    for ours, theirs in zip(scratch, harness["log_likelihoods"]):
        assert ours == pytest.approx(theirs, abs=1e-4)
    assert harness["acc"] == sum(pick == item["label"] for pick, item in zip(picks, items)) / N
    assert harness["acc_stderr"] == pytest.approx(math.sqrt(harness["acc"] * (1 - harness["acc"]) / (N - 1)))
    assert 0 <= harness["acc_norm"] <= 1
    assert tokenizer.pad_token is None  # the harness set its padding token on a copy, not on ours


def test_a_rewritten_task_is_read_afresh_and_limit_takes_the_first_items(embedded, tmp_path, offline):
    model, tokenizer = embedded
    for seed, limit in ((1, None), (2, 4)):  # same folder and names, other items: no stale datasets cache
        items = tasks.docstring_items(n=6, seed=seed)
        tasks.write_task(tmp_path, items)
        harness = tasks.harness_accuracy(model, tokenizer, tmp_path, batch_size=4, limit=limit)
        scratch = tasks.choice_log_likelihoods(model, tokenizer, items[:limit], batch_size=3)
        for ours, theirs in zip(scratch, harness["log_likelihoods"], strict=True):
            assert ours == pytest.approx(theirs, abs=1e-4)


def test_scoring_needs_items_and_a_written_task(embedded, tmp_path):
    model, tokenizer = embedded
    with pytest.raises(LessonError, match="docstring_items"):
        tasks.accuracy(model, tokenizer, [])
    with pytest.raises(LessonError, match="write_task"):
        tasks.harness_accuracy(model, tokenizer, tmp_path)
