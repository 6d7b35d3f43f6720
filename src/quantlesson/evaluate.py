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

import dataclasses
import math
from collections.abc import Iterator

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
    """Yield ``(log_probs [n, vocab] float32, targets [n])`` window by window."""
    from tqdm import tqdm

    if ids.ndim != 1:
        raise LessonError(f"Expected a 1-D tensor of token ids, got shape {tuple(ids.shape)}.")
    device = next(model.parameters()).device
    spans = list(windows(ids.numel(), window, stride))
    for begin, end, first_target in tqdm(spans, desc="evaluating", disable=not progress or len(spans) < 8, leave=False):
        chunk = ids[begin:end].to(device)[None]  # [1, L]
        with torch.inference_mode():
            logits = model(input_ids=chunk).logits[0].float()  # [L, vocab]
        predicting = logits[first_target - begin - 1 : end - begin - 1]  # logits at position t-1 predict token t
        yield F.log_softmax(predicting, dim=-1).cpu(), ids[first_target:end]


def perplexity(model, ids: torch.Tensor, window: int = WINDOW, stride: int = STRIDE, progress: bool = True) -> float:
    """Perplexity of ``model`` on ``ids`` (1-D), with a sliding window."""
    total, count = 0.0, 0
    for log_probs, targets in _log_probs(model, ids, window, stride, progress):
        total -= log_probs.gather(1, targets[:, None]).sum().item()
        count += targets.numel()
    return math.exp(total / count)


@dataclasses.dataclass(frozen=True)
class Reference:
    """The unquantized model's next-token log-probabilities on fixed evaluation ids."""

    ids: torch.Tensor  # [N] evaluation token ids
    log_probs: torch.Tensor  # [N - 1, vocab] float32, row i predicts ids[i + 1]
    window: int
    stride: int


def reference(model, ids: torch.Tensor, window: int = WINDOW, stride: int = STRIDE, progress: bool = True) -> Reference:
    """Compute the :class:`Reference` of the unquantized ``model`` on ``ids`` (keep it; reuse it for every variant).

    It holds ``(len(ids) - 1) x vocab`` float32 numbers: 16k tokens of a 4k vocabulary is 256 MB.
    """
    rows = [log_probs for log_probs, _ in _log_probs(model, ids, window, stride, progress)]
    return Reference(ids=ids, log_probs=torch.cat(rows), window=window, stride=stride)


def compare(model, ref: Reference, progress: bool = True) -> dict[str, float]:
    """Perplexity, KL divergence and top-1 agreement of ``model`` against ``ref``, in one pass.

    Returns ``{"perplexity": ..., "kld": ..., "top1": ...}``; ``kld`` is the mean
    over positions of KL(reference || model) in nats, ``top1`` a fraction in [0, 1].
    """
    nll, kld, agree, count = 0.0, 0.0, 0, 0
    for log_q, targets in _log_probs(model, ref.ids, ref.window, ref.stride, progress):
        log_p = ref.log_probs[count : count + targets.numel()]
        if log_p.shape != log_q.shape:
            raise LessonError(
                f"The reference has vocabulary {ref.log_probs.shape[-1]} but the model {log_q.shape[-1]}: "
                "compare a model only with the reference of its own unquantized version."
            )
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
