"""Quality of a (quantized) model: perplexity, KL divergence and top-1 agreement.

All three score the same tokens: a 1-D tensor of evaluation ids cut into
windows of ``window`` tokens that start every ``stride`` tokens. Every token
after the first is scored exactly once, with up to ``window - 1`` tokens of
context (the sliding-window method of the Hugging Face perplexity guide).

* **Perplexity** is ``exp(mean negative log-likelihood)`` of the true next tokens.
  It needs nothing but the model, but it moves little for small quantization errors.
* **KL divergence** ``KL(reference || model)`` compares the whole next-token
  distribution with the unquantized model's, position by position (llama.cpp's
  ``--kl-divergence`` does the same).
* **Top-1 agreement** is how often both models pick the same next token.

KL divergence and top-1 agreement need a :class:`Reference`: the unquantized
model's log-probabilities, computed once with :func:`reference`.
"""

from __future__ import annotations

import math
import os
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np

import torch
import torch.nn.functional as F

from quantlesson.errors import LessonError

WINDOW = 512
STRIDE = 256


def windows(n_tokens: int, window: int = WINDOW, stride: int = STRIDE) -> Iterator[tuple[int, int, int]]:
    """Yield ``(begin, end, first_target)`` for each window.

    The model reads ``ids[begin:end]`` and is scored on the targets
    ``ids[first_target:end]``; together the windows score every token from 1 to
    ``n_tokens - 1`` exactly once. A window starts at most one token before the
    first target it scores, so ``stride == window`` still scores every token.
    """
    if window < 2 or not 1 <= stride <= window:
        raise LessonError(f"Need window >= 2 and 1 <= stride <= window (got window={window}, stride={stride}).")
    if n_tokens < 2:
        raise LessonError(f"Need at least 2 tokens to score a next-token prediction (got {n_tokens}).")
    scored_until, begin = 1, 0
    while scored_until < n_tokens:
        end = min(begin + window, n_tokens)
        if end > scored_until:
            yield begin, end, max(scored_until, begin + 1)
            scored_until = end
        begin = min(begin + stride, scored_until - 1)  # the next target needs one token of context


def _log_probs(model, ids: torch.Tensor, window: int, stride: int, progress: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(log_probs [n, vocab] float32, targets [n])`` window by window, on the model's device."""
    from tqdm import tqdm

    check_ids(ids, model)
    device = model_device(model)
    spans = list(windows(ids.numel(), window, stride))
    for begin, end, first_target in tqdm(spans, desc="evaluating", disable=not progress or len(spans) < 8, leave=False):
        chunk = ids[begin:end].to(device)[None]  # [1, L]
        with torch.inference_mode():
            logits = model(input_ids=chunk).logits[0].float()  # [L, vocab]
        predicting = logits[first_target - begin - 1 : end - begin - 1]  # logits at position t-1 predict token t
        yield F.log_softmax(predicting, dim=-1), ids[first_target:end].to(device)


def model_device(model) -> torch.device:
    """The device of the model's first parameter (a clear error for a module without any)."""
    parameter = next(iter(model.parameters()), None)
    if parameter is None:
        raise LessonError(
            f"{type(model).__name__} has no parameters, so it is not a language model to evaluate: "
            "pass the model returned by models.load() (or a quantized copy of it)."
        )
    return parameter.device


def check_ids(ids: torch.Tensor, model=None) -> None:
    """Refuse token ids that are not a 1-D integer tensor inside the model's vocabulary."""
    if not isinstance(ids, torch.Tensor) or ids.ndim != 1:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise LessonError(f"Expected a 1-D tensor of token ids, got {shape}: use data.evaluation_tokens(tokenizer).")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise LessonError(f"Token ids must be integers, not {ids.dtype}: use tokenizer(text).input_ids or data.evaluation_tokens.")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if ids.numel() and (ids.min() < 0 or (vocab is not None and ids.max() >= vocab)):
        raise LessonError(
            f"Token ids run from {ids.min().item()} to {ids.max().item()}, outside this model's vocabulary "
            f"(0..{vocab - 1 if vocab else '?'}): tokenize the text with the model's own tokenizer."
        )


def perplexity(model, ids: torch.Tensor, window: int = WINDOW, stride: int = STRIDE, progress: bool = True) -> float:
    """Perplexity of ``model`` on ``ids`` (1-D), with a sliding window."""
    total, count = 0.0, 0
    for log_probs, targets in _log_probs(model, ids, window, stride, progress):
        total -= log_probs.gather(1, targets[:, None]).sum().item()
        count += targets.numel()
    return math.exp(total / count)


IN_MEMORY_LIMIT = 1 << 30  # a reference larger than this (bytes) is kept on disk and read window by window


class Reference:
    """The unquantized model's next-token log-probabilities on fixed evaluation ids.

    Row ``i`` predicts ``ids[i + 1]``. A small reference lives in memory; a large one
    (more than ``IN_MEMORY_LIMIT`` bytes: 16k tokens of a 49k vocabulary are 3.2 GB) lives in a
    file, written and read one window at a time, so memory stays flat whatever the vocabulary.
    The file is deleted with the object.
    """

    def __init__(self, ids: torch.Tensor, window: int, stride: int, vocab: int,
                 log_probs: torch.Tensor | None = None, path: Path | None = None):  # fmt: skip
        self.ids, self.window, self.stride, self.vocab = ids, window, stride, vocab
        self._in_memory, self.path = log_probs, path
        if path is not None:
            weakref.finalize(self, Path(path).unlink, True)

    @property
    def n_rows(self) -> int:
        return self.ids.numel() - 1

    @property
    def nbytes(self) -> int:
        """Size of the log-probabilities: rows x vocab x 4 bytes."""
        return self.n_rows * self.vocab * 4

    def rows(self, start: int, count: int) -> torch.Tensor:
        """Rows ``start .. start + count`` as float32 ``[count, vocab]`` (read from disk if it lives there)."""
        if self._in_memory is not None:
            return self._in_memory[start : start + count]
        values = np.fromfile(self.path, dtype=np.float32, count=count * self.vocab, offset=start * self.vocab * 4)
        return torch.from_numpy(values).view(count, self.vocab)

    @property
    def log_probs(self) -> torch.Tensor:
        """All rows ``[len(ids) - 1, vocab]`` in memory (for a small reference; large ones: use :meth:`rows`)."""
        return self.rows(0, self.n_rows)


def reference(model, ids: torch.Tensor, window: int = WINDOW, stride: int = STRIDE, progress: bool = True,
              in_memory_limit: int = IN_MEMORY_LIMIT, folder: Path | None = None) -> Reference:  # fmt: skip
    """Compute the :class:`Reference` of the unquantized ``model`` on ``ids`` (keep it; reuse it for every variant).

    It holds ``(len(ids) - 1) x vocab`` float32 numbers: 16k tokens of a 4k vocabulary is 256 MB, kept in
    memory; above ``in_memory_limit`` bytes they go to a file in ``folder`` (default: the lesson's cache).
    """
    check_ids(ids, model)
    vocab = _vocab_size(model, ids)
    nbytes = (ids.numel() - 1) * vocab * 4
    if nbytes <= in_memory_limit:
        table, row = torch.empty(ids.numel() - 1, vocab), 0  # filled window by window: no second copy
        for log_probs, _ in _log_probs(model, ids, window, stride, progress):
            table[row : row + len(log_probs)] = log_probs.cpu()
            row += len(log_probs)
        return Reference(ids, window, stride, vocab, log_probs=table)
    from quantlesson.embedded import cache_root

    folder = Path(folder or cache_root() / "references")
    folder.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=folder, suffix=".f32")
    print(f"Reference: {nbytes / 1e9:.1f} GB of log-probabilities, kept on disk ({name}) and read window by window")
    try:
        with os.fdopen(handle, "wb") as file:
            for log_probs, _ in _log_probs(model, ids, window, stride, progress):
                file.write(log_probs.cpu().numpy().tobytes())
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Reference(ids, window, stride, vocab, path=Path(name))


def _vocab_size(model, ids: torch.Tensor) -> int:
    """The width of the model's logits, from one short forward pass."""
    device = model_device(model)
    with torch.inference_mode():
        return model(input_ids=ids[:2].to(device)[None]).logits.shape[-1]


def compare(model, ref: Reference, progress: bool = True) -> dict[str, float]:
    """Perplexity, KL divergence and top-1 agreement of ``model`` against ``ref``, in one pass.

    Returns ``{"perplexity": ..., "kld": ..., "top1": ...}``; ``kld`` is the mean
    over positions of KL(reference || model) in nats, ``top1`` a fraction in [0, 1].
    The work is done window by window on the model's device; memory does not grow with the text.
    """
    nll, kld, agree, count = 0.0, 0.0, 0, 0
    for log_q, targets in _log_probs(model, ref.ids, ref.window, ref.stride, progress):
        if log_q.shape[-1] != ref.vocab:
            raise LessonError(
                f"The reference has vocabulary {ref.vocab} but the model {log_q.shape[-1]}: "
                "compare a model only with the reference of its own unquantized version."
            )
        log_p = ref.rows(count, targets.numel()).to(log_q.device)  # [n, vocab]
        nll -= log_q.gather(1, targets[:, None]).sum().item()
        kld += (log_p.exp() * (log_p - log_q)).sum().item()
        agree += (log_p.argmax(-1) == log_q.argmax(-1)).sum().item()
        count += targets.numel()
    return {"perplexity": math.exp(nll / count), "kld": max(kld / count, 0.0), "top1": agree / count}


def kl_divergence(model, ref: Reference, progress: bool = True) -> float:
    """Mean KL(reference || model) per token, in nats (0 for identical models)."""
    return compare(model, ref, progress)["kld"]


def top1_agreement(model, ref: Reference, progress: bool = True) -> float:
    """Fraction of positions where ``model`` and the reference predict the same next token."""
    return compare(model, ref, progress)["top1"]


def generate(model, tokenizer, prompt: str, new_tokens: int = 40) -> str:
    """Greedy continuation of ``prompt`` (for a look at the text, not for measurement)."""
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(output[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
