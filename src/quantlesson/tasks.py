"""Task accuracy: a small multiple-choice task built offline, scored by lm-evaluation-harness and from scratch.

Perplexity and KL divergence watch every next token; a *task* asks whether the model still picks the right
answer. Each item shows the summary of a documented function from the standard library's held-out modules
as a comment, then ``def``, and offers ``choices`` function names: the real one and others drawn at random::

    # Class decorator that fills in missing ordering methods
    def total_ordering | close_when_done | recv_bytes | mksalt

The model's answer is the choice whose tokens it gives the highest total log-probability after the context,
the ``acc`` metric of EleutherAI's lm-evaluation-harness (``lm_eval``). :func:`harness_accuracy` runs the
harness on a task file written by :func:`write_task`; :func:`accuracy` computes the same number in a few
lines of torch, with the harness's tokenization convention (:func:`encode_pair`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from quantlesson import chat, modelcard
from quantlesson.errors import LessonError

TASK_NAME = "lesson_docstrings"
TARGET_DELIMITER = " "  # lm-eval puts this between the context and each choice (its default)


def _summaries(split: str) -> list[tuple[str, str]]:
    """``(function name, one-line summary)`` of the split's documented functions, each pair once.

    A summary that names its own function would give the answer away, so those are left out.
    """
    found = []
    for qualified, paragraph in chat.documented_functions(split):
        name, summary = qualified.rsplit(".", 1)[-1], " ".join(paragraph.split())
        if summary and name not in summary and (name, summary) not in found:
            found.append((name, summary))
    return found


def docstring_items(split: str = "evaluation", n: int | None = None, choices: int = 4, seed: int = 0) -> list[dict]:
    """``n`` multiple-choice items (all the split's usable functions if ``n`` is None), the same for the same seed.

    Each item is ``{"context": "# <summary>\\ndef", "choices": [names], "label": index of the right name}``;
    the other ``choices - 1`` names belong to other functions of the split (never to one with the same summary).
    """
    if n is not None and n < 1:
        raise LessonError(f"n={n}: ask for at least one item (or n=None for every usable function).")
    if choices < 2:
        raise LessonError(f"choices={choices}: a multiple-choice item needs at least 2 choices.")
    functions = _summaries(split)
    names = sorted({name for name, _ in functions})
    if n is not None and n > len(functions):
        raise LessonError(f"The {split} split has {len(functions)} usable documented functions, fewer than n={n}: "
                          "ask for fewer items, or pass n=None to use them all.")
    if choices > len(names):
        raise LessonError(f"The {split} split has {len(names)} distinct function names, fewer than choices={choices}: "
                          "ask for fewer choices.")
    rng = random.Random(seed)
    items = []
    for name, summary in rng.sample(functions, n or len(functions)):
        right = {other for other, same in functions if same == summary}  # every name this summary documents
        others = [other for other in rng.sample(names, len(names)) if other not in right][: choices - 1]
        if len(others) < choices - 1:
            raise LessonError(f"Too few other function names for {name!r} in the {split} split: ask for fewer choices.")
        label = rng.randrange(choices)
        items.append({"context": f"# {summary}\ndef", "choices": others[:label] + [name] + others[label:], "label": label})
    return items


def task_config(data_file: Path, name: str = TASK_NAME) -> dict:
    """The lm-eval task config (the YAML's content) for a JSON-lines file of items."""
    metric = {"aggregation": "mean", "higher_is_better": True}
    return {
        "task": name,
        "dataset_path": "json",  # the `datasets` library's local JSON loader: no hub, no network
        "dataset_kwargs": {
            "data_files": {"test": str(data_file.resolve())},
            "cache_dir": str(data_file.resolve().with_suffix(".datasets-cache")),  # not ~/.cache/huggingface
        },
        "output_type": "multiple_choice",
        "test_split": "test",
        "num_fewshot": 0,
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": TARGET_DELIMITER,
        "metric_list": [{"metric": "acc", **metric}, {"metric": "acc_norm", **metric}],
        "metadata": {"version": 1.0},
    }


def write_task(folder: str | Path, items: list[dict], name: str = TASK_NAME) -> Path:
    """Write ``<name>.jsonl`` (the items) and ``<name>.yaml`` (the lm-eval task) into ``folder``; return the YAML's path."""
    import yaml

    if not items:
        raise LessonError("No items to write: make them with tasks.docstring_items().")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data_file = modelcard._write_atomically(folder / f"{name}.jsonl", "".join(json.dumps(item) + "\n" for item in items))
    header = "# An lm-evaluation-harness task written by quantlesson.tasks.write_task; it reads only local files.\n"
    return modelcard._write_atomically(folder / f"{name}.yaml", header + yaml.safe_dump(task_config(data_file, name), sort_keys=False))


@contextlib.contextmanager
def _quiet(logger_name: str = "lm_eval", level: int = logging.ERROR) -> Iterator[None]:
    """Raise one logger's level for the duration of a block, then put it back."""
    logger = logging.getLogger(logger_name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


@contextlib.contextmanager
def _datasets_offline() -> Iterator[None]:
    """``datasets`` offline for a block: the task is a local file, so nothing may be fetched.

    ``datasets`` reads ``HF_DATASETS_OFFLINE`` once, at its first import; imported earlier without it and with an
    empty cache, its json loader reached for s3.amazonaws.com (seen in the lesson's CI).
    """
    import datasets.config

    saved = datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved


def harness_accuracy(model, tokenizer, folder: str | Path, name: str = TASK_NAME, batch_size: int = 8,
                     limit: int | None = None) -> dict:  # fmt: skip
    """Accuracy of a loaded model on the task in ``folder``, measured by lm-evaluation-harness.

    Returns ``{"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}`` (fractions) and ``"log_likelihoods"``:
    per item, the harness's log-probability of each choice. ``acc_norm`` divides each choice's
    log-probability by its length in characters before picking the largest. ``limit`` scores only the
    first ``limit`` items, as ``accuracy(model, tokenizer, items[:limit])`` would.
    """
    import copy

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if not (Path(folder) / f"{name}.yaml").exists():
        raise LessonError(f"No task {name!r} in {folder}: write it first with tasks.write_task(folder, items).")
    with _quiet(), _datasets_offline():
        # A copy of the tokenizer: the harness sets a padding token on the one it is given.
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size, softmax_dtype=torch.float32)
        results = simple_evaluate(
            model=lm, tasks=[name], task_manager=TaskManager(include_path=str(folder), include_defaults=False),
            limit=limit, log_samples=True, random_seed=None, numpy_random_seed=None, torch_random_seed=None,
        )  # fmt: skip
    scores = results["results"][name]
    samples = sorted(results["samples"][name], key=lambda sample: sample["doc_id"])
    return {
        **{key: float(scores[f"{key},none"]) for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")},
        "log_likelihoods": [[float(ll) for ll, _ in sample["filtered_resps"]] for sample in samples],
    }


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and of ``continuation`` after it, the way lm-eval's Hugging Face model splits them.

    Spaces at the end of the context move to the continuation; the whole text is encoded once, and the
    continuation's ids are those after the context's own encoding.
    """
    if not context:
        raise LessonError("An item needs a non-empty context: build items with tasks.docstring_items().")
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, context_ids = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return context_ids, whole[len(context_ids) :]


def _score(model, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
    """Sum of log p(continuation token | everything before it), for each ``(context ids, continuation ids)`` pair."""
    from quantlesson.evaluate import model_device

    inputs = [(context + continuation)[:-1] for context, continuation in pairs]  # the last token is only a target
    ids = torch.zeros(len(inputs), max(map(len, inputs)), dtype=torch.long)  # [B, T], right-padded with 0
    for row, tokens in enumerate(inputs):
        ids[row, : len(tokens)] = torch.tensor(tokens)
    with torch.inference_mode():
        logits = model(input_ids=ids.to(model_device(model))).logits  # [B, T, vocab]
        log_probs = F.log_softmax(logits.float(), dim=-1)  # in float32, as harness_accuracy has the harness do
    scores = []
    for row, (context, continuation) in enumerate(pairs):
        first = len(context) - 1  # position t predicts token t + 1: the first continuation token is read at len - 1
        positions = torch.arange(first, first + len(continuation), device=log_probs.device)  # [C]
        targets = torch.tensor(continuation, device=log_probs.device)  # [C]
        scores.append(log_probs[row, positions, targets].sum().item())
    return scores


def choice_log_likelihoods(model, tokenizer, items: list[dict], batch_size: int = 8) -> list[list[float]]:
    """Per item, the log-probability of each choice after the context (``" " + choice``, as the task config says)."""
    if batch_size < 1:
        raise LessonError(f"batch_size={batch_size}: score at least one sequence at a time.")
    pairs = [encode_pair(tokenizer, item["context"], TARGET_DELIMITER + choice)
             for item in items for choice in item["choices"]]  # fmt: skip
    scores = []
    for start in range(0, len(pairs), batch_size):
        scores += _score(model, pairs[start : start + batch_size])
    per_item, start = [], 0
    for item in items:
        per_item.append(scores[start : start + len(item["choices"])])
        start += len(item["choices"])
    return per_item


def accuracy(model, tokenizer, items: list[dict], batch_size: int = 8) -> float:
    """Fraction of items whose right choice gets the highest log-probability (lm-eval's ``acc``), from scratch."""
    if not items:
        raise LessonError("No items to score: make them with tasks.docstring_items().")
    scores = choice_log_likelihoods(model, tokenizer, items, batch_size)
    return sum(max(range(len(s)), key=s.__getitem__) == item["label"] for s, item in zip(scores, items)) / len(items)
