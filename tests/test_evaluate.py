"""evaluate: the sliding windows, perplexity, KL divergence and top-1 agreement."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlesson import LessonError, evaluate


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 400), window=st.integers(2, 64), data=st.data())
def test_windows_score_every_token_once(n, window, data):
    stride = data.draw(st.integers(1, window))
    scored = []
    for begin, end, first in evaluate.windows(n, window, stride):
        assert end - begin <= window and begin < first <= end
        scored.extend(range(first, end))
    assert scored == list(range(1, n))


class Uniform(torch.nn.Module):
    """A 'model' whose logits are all equal: every next token has probability 1/vocab."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()


def test_perplexity_of_uniform_logits_is_the_vocabulary_size():
    ids = torch.randint(0, 50, (300,))
    assert evaluate.perplexity(Uniform(50), ids, window=64, stride=32) == pytest.approx(50)


def test_a_model_against_itself_has_zero_kld_and_full_agreement(tiny_llama):
    ids = torch.randint(0, 128, (200,))
    ref = evaluate.reference(tiny_llama, ids, window=64, stride=32)
    result = evaluate.compare(tiny_llama, ref)
    assert result["kld"] == pytest.approx(0, abs=1e-7) and result["top1"] == 1
    assert result["perplexity"] == pytest.approx(evaluate.perplexity(tiny_llama, ids, window=64, stride=32))


def test_kld_is_positive_for_a_different_model(tiny_llama):
    ids = torch.randint(0, 128, (200,))
    ref = evaluate.reference(tiny_llama, ids, window=64, stride=64)
    kld = evaluate.kl_divergence(Uniform(128), ref)
    # KL(p || uniform) = log(vocab) - entropy(p) > 0
    p = ref.log_probs.exp()
    entropy = -(p * ref.log_probs).sum(-1).mean().item()
    assert kld == pytest.approx(math.log(128) - entropy, rel=1e-4)


def test_reference_from_another_vocabulary_is_refused(tiny_llama):
    ids = torch.randint(0, 50, (100,))
    ref = evaluate.reference(Uniform(50), ids, window=32, stride=32)
    with pytest.raises(LessonError, match="vocabulary"):
        evaluate.compare(tiny_llama, ref)


def test_bad_windows_are_refused():
    with pytest.raises(LessonError):
        list(evaluate.windows(100, window=16, stride=32))
    with pytest.raises(LessonError):
        list(evaluate.windows(1, window=16, stride=8))
