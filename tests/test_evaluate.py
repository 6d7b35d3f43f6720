"""evaluate: the sliding windows, perplexity, KL divergence and top-1 agreement."""

import math
from types import SimpleNamespace

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
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))  # (a new class per call would hold its logits until the next garbage collection)


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


def test_a_reference_on_disk_gives_the_same_scores_as_one_in_memory(tiny_llama, tmp_path):
    ids = torch.randint(0, 128, (300,))
    in_memory = evaluate.reference(tiny_llama, ids, window=64, stride=32)
    on_disk = evaluate.reference(tiny_llama, ids, window=64, stride=32, in_memory_limit=0, folder=tmp_path)
    assert on_disk.path is not None and on_disk.path.stat().st_size == on_disk.nbytes == 299 * 128 * 4
    assert torch.equal(on_disk.log_probs, in_memory.log_probs)
    other = Uniform(128)
    assert evaluate.compare(other, on_disk) == evaluate.compare(other, in_memory)
    path = on_disk.path
    del on_disk
    import gc

    gc.collect()
    assert not path.exists()  # the file goes with the reference


def test_a_large_vocabulary_reference_streams_in_flat_memory(tmp_path):
    """2,048 tokens of a 262,144-token vocabulary (Gemma 3's) would be 2.1 GB in memory; streamed, memory stays flat."""
    from quantlesson import measure

    vocab, ids = 262_144, torch.randint(0, 262_144, (2048,))
    with measure.PeakMemory() as memory:
        ref = evaluate.reference(Uniform(vocab), ids, window=128, stride=128, progress=False, folder=tmp_path)
        result = evaluate.compare(Uniform(vocab), ref, progress=False)
    assert ref.nbytes > 2e9 and ref.path is not None
    assert result["kld"] == pytest.approx(0, abs=1e-6) and result["perplexity"] == pytest.approx(vocab, rel=1e-3)
    assert memory.increase < ref.nbytes / 2, f"peak grew by {memory.increase / 1e9:.2f} GB"  # a few windows of 128 rows, not all rows


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (torch.zeros(2, 10, dtype=torch.long), "1-D tensor"),
        (torch.rand(50), "integers"),
        (torch.tensor([1, 2, 500]), "vocabulary"),
        (torch.tensor([1, -2, 5]), "vocabulary"),
        ([1, 2, 3], "1-D tensor"),
    ],
)
def test_bad_token_ids_say_what_to_do(tiny_llama, ids, message):
    with pytest.raises(LessonError, match=message):
        evaluate.perplexity(tiny_llama, ids)


def test_a_module_without_parameters_is_refused():
    with pytest.raises(LessonError, match="no parameters"):
        evaluate.perplexity(torch.nn.Sequential(), torch.arange(10))
