"""Text for training, calibration and evaluation.

Two sources, chosen the same way as the model (see :func:`source`):

* ``"embedded"``: text present on every Python install -- the standard library's
  own sources (``domain="code"``) and the documentation topics that ``pydoc``
  ships (``domain="prose"``). Each file (or topic) goes to exactly one split,
  chosen by a hash of its name, so training, calibration and evaluation text
  never share a document. Licence: Python Software Foundation License (see
  ``LICENSE.txt`` in the standard library folder).
* ``"hub"``: WikiText-2 (test split) for evaluation and pile-val for
  calibration, through the ``datasets`` library.

Functions here return plain strings or token tensors; nothing is cached in
module state.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

import torch

from quantlesson.errors import LessonError

SPLITS = ("train", "calibration", "evaluation")
DOMAINS = ("code", "prose")
HUB_EVALUATION = ("wikitext", "wikitext-2-raw-v1", "test")
HUB_CALIBRATION = ("mit-han-lab/pile-val-backup", None, "validation")
_SKIPPED_FOLDERS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}


def source() -> str:
    """Which text the lesson uses: ``LESSON_DATA`` if set, else follow ``LESSON_MODEL``.

    ``LESSON_MODEL=embedded`` or ``smollm2-offline`` (the models that need no hub) means embedded
    text; any hub model means hub data.
    """
    chosen = os.environ.get("LESSON_DATA")
    if chosen is None:
        chosen = "embedded" if os.environ.get("LESSON_MODEL", "").strip() in ("embedded", "smollm2-offline") else "hub"
    if chosen not in ("embedded", "hub"):
        raise LessonError(f"LESSON_DATA={chosen!r} is not known: use 'embedded' or 'hub'.")
    return chosen


def split_of(name: str) -> str:
    """The split a document belongs to, from a hash of its name: 5 % evaluation, 5 % calibration."""
    bucket = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100
    if bucket < 5:
        return "evaluation"
    if bucket < 10:
        return "calibration"
    return "train"


def stdlib_folder() -> Path:
    """The folder holding this Python's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def _code_documents() -> dict[str, str]:
    root = stdlib_folder()
    documents = {}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if _SKIPPED_FOLDERS.intersection(relative.parts):
            continue
        documents[relative.as_posix()] = path.read_text(encoding="utf-8", errors="replace")
    return documents


def _prose_documents() -> dict[str, str]:
    from pydoc_data.topics import topics  # the Python documentation, as plain text

    return {f"pydoc:{name}": topics[name] for name in sorted(topics)}


def embedded_documents(split: str, domain: str = "code") -> dict[str, str]:
    """The embedded corpus's documents of one split and domain, by name, in sorted order."""
    if split not in SPLITS:
        raise LessonError(f"split={split!r} is not known: use one of {SPLITS}.")
    if domain not in DOMAINS + ("all",):
        raise LessonError(f"domain={domain!r} is not known: use 'code', 'prose' or 'all'.")
    documents: dict[str, str] = {}
    if domain in ("code", "all"):
        documents.update(_code_documents())
    if domain in ("prose", "all"):
        documents.update(_prose_documents())
    return {name: text for name, text in documents.items() if split_of(name) == split}


def embedded_text(split: str, domain: str = "code") -> str:
    """One string: the split's documents joined by blank lines."""
    return "\n\n".join(embedded_documents(split, domain).values())


def _hub_text(name: str, config: str | None, split: str, field: str = "text", max_chars: int | None = None) -> str:
    try:
        import datasets

        rows = datasets.load_dataset(name, config, split=split, streaming=max_chars is not None)
    except Exception as error:  # offline, no such data set, no permission...
        raise LessonError(
            f"Could not load the data set {name!r} ({type(error).__name__}: {error}). "
            "Without access to the Hugging Face Hub, run with LESSON_MODEL=embedded "
            "(or LESSON_DATA=embedded) to use the text that ships with Python."
        ) from error
    parts, total = [], 0
    for row in rows:
        parts.append(row[field])
        total += len(row[field])
        if max_chars is not None and total >= max_chars:
            break
    return "\n\n".join(parts)


def evaluation_text(domain: str = "code") -> str:
    """The evaluation text: held-out embedded text, or WikiText-2's test split from the hub.

    ``domain`` ("code" or "prose") only applies to the embedded source.
    """
    if source() == "hub":
        name, config, split = HUB_EVALUATION
        print(f"Evaluation text: {name}/{config} ({split} split) from the Hugging Face Hub")
        return _hub_text(name, config, split)
    print(f"Evaluation text: embedded {domain} text, evaluation split (Python {_python_version()} standard library)")
    return embedded_text("evaluation", domain)


def calibration_text(domain: str = "code", max_chars: int = 2_000_000) -> str:
    """The calibration text: embedded calibration split, or pile-val from the hub."""
    if source() == "hub":
        name, config, split = HUB_CALIBRATION
        print(f"Calibration text: {name} ({split} split) from the Hugging Face Hub")
        return _hub_text(name, config, split, max_chars=max_chars)
    print(f"Calibration text: embedded {domain} text, calibration split (Python {_python_version()} standard library)")
    return embedded_text("calibration", domain)


def token_windows(ids: torch.Tensor, n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``n`` windows of ``seq_len`` tokens cut at random (seeded) offsets from a 1-D tensor of ids.

    Returns a LongTensor of shape ``[n, seq_len]``.
    """
    if n < 1 or seq_len < 1:
        raise LessonError(f"Need n >= 1 and seq_len >= 1 (got n={n}, seq_len={seq_len}).")
    total = ids.numel()
    if seq_len > total:
        raise LessonError(
            f"seq_len={seq_len} is longer than the text ({total} tokens): use seq_len <= {total} or more text."
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seq_len + 1, (n,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def calibration_tokens(tokenizer, n: int = 32, seq_len: int = 256, domain: str = "code", seed: int = 0) -> torch.Tensor:
    """Calibration batch: ``n`` windows of ``seq_len`` tokens, LongTensor ``[n, seq_len]``."""
    ids = tokenizer(calibration_text(domain), return_tensors="pt").input_ids[0]
    return token_windows(ids, n, seq_len, seed)


def calibration_texts(tokenizer, n: int = 32, seq_len: int = 256, domain: str = "code", seed: int = 0) -> list[str]:
    """The same windows as :func:`calibration_tokens`, decoded back to strings (for libraries that want text)."""
    return tokenizer.batch_decode(calibration_tokens(tokenizer, n, seq_len, domain, seed))


def calibration_dataset(tokenizer, n: int = 32, seq_len: int = 256, domain: str = "code", seed: int = 0):
    """The calibration windows as a ``datasets.Dataset`` with ``input_ids`` and ``attention_mask``.

    This is the form llm-compressor's ``oneshot(dataset=...)`` accepts without further processing.
    """
    import datasets

    windows = calibration_tokens(tokenizer, n, seq_len, domain, seed)
    return datasets.Dataset.from_dict(
        {"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()}
    )


def evaluation_tokens(tokenizer, max_tokens: int | None = 16_384, domain: str = "code") -> torch.Tensor:
    """The first ``max_tokens`` tokens of the evaluation text, as a 1-D LongTensor."""
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2):
        raise LessonError(
            f"max_tokens={max_tokens!r}: give a whole number of tokens, at least 2 (the lesson uses 16_384), "
            "or None for the whole evaluation text."
        )
    ids = tokenizer(evaluation_text(domain), return_tensors="pt").input_ids[0]
    if max_tokens is not None:
        if max_tokens > ids.numel():
            raise LessonError(
                f"max_tokens={max_tokens} is more than the evaluation text holds ({ids.numel()} tokens)."
            )
        ids = ids[:max_tokens]
    return ids


LARGE_ON_CPU = 20_000_000  # parameters above which a CPU run is cut to a laptop's budget


def evaluation_budget(model, tokens: int = 16_384, cpu_tokens: int = 4_096) -> int:
    """How many evaluation tokens to score: ``tokens`` on a GPU or for a small model; ``cpu_tokens`` for a model
    of more than 20 M parameters on a CPU (so that a notebook on SmolLM2-135M finishes on a laptop). Prints the choice."""
    parameters, device = _size_and_device(model)
    chosen = cpu_tokens if device.type == "cpu" and parameters > LARGE_ON_CPU else tokens
    reason = "a large model on a CPU" if chosen != tokens else f"a {'small model' if device.type == 'cpu' else 'GPU'}"
    print(f"Evaluation budget: {chosen:,} tokens ({parameters / 1e6:.1f} M parameters on {device.type}: {reason})")
    return chosen


def is_large_on_cpu(model) -> bool:
    """True for a model of more than 20 M parameters on a CPU: notebooks then run shorter sweeps (and say so)."""
    parameters, device = _size_and_device(model)
    return device.type == "cpu" and parameters > LARGE_ON_CPU


def _size_and_device(model) -> tuple[int, torch.device]:
    """Number of parameters and the device of the first one (a clear error for a module without any)."""
    parameters = list(model.parameters())
    if not parameters:
        raise LessonError(f"{type(model).__name__} has no parameters: pass the model returned by models.load().")
    return sum(p.numel() for p in parameters), parameters[0].device


def _python_version() -> str:
    import platform

    return platform.python_version()
