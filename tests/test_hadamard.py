"""Randomized Hadamard rotations from scratch: orthogonal, equal to compressed-tensors' matrix for the same
generator, outlier-spreading, and fused into a Llama without changing what it computes."""

import copy

import pytest
import torch

from quantlesson import LessonError
from quantlesson.scratch import hadamard, rtn


@pytest.mark.parametrize("n", [1, 2, 64, 256])
def test_sylvester_rows_are_orthogonal(n):
    h = hadamard.sylvester(n)
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", [64, 576, 768])
def test_rotation_is_orthogonal_also_for_sizes_that_are_no_power_of_two(n):
    r = hadamard.rotation(n, seed=3)
    assert torch.allclose(r @ r.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert hadamard.block_size(576) == 64 and hadamard.block_size(768) == 256


@pytest.mark.parametrize("n", [64, 512, 2048])
def test_random_hadamard_equals_compressed_tensors_for_the_same_generator(n):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.transform.utils.hadamard import random_hadamard_matrix

    ours = hadamard.random_hadamard(n, torch.Generator().manual_seed(11))
    theirs = random_hadamard_matrix(n, torch.float64, torch.device("cpu"), torch.Generator().manual_seed(11))
    assert torch.equal(ours * n**0.5, theirs)  # the library normalises by 1/sqrt(n) when it applies the matrix


def outlier_weight() -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.randn(128, 256)
    w[:, [5, 77]] *= 25  # two outlier input channels, as LLM activations and weights have
    return w


def test_rotation_spreads_outliers_and_lowers_the_rtn_error():
    w = outlier_weight()
    rotated = hadamard.rotate_input_side(w, hadamard.rotation(256))
    assert hadamard.kurtosis(rotated).mean() < 0.2 * hadamard.kurtosis(w).mean()
    assert hadamard.max_over_rms(rotated).mean() < hadamard.max_over_rms(w).mean() / 2
    for bits in (3, 4):
        plain = ((rtn.fake_quantize(w, bits, 64) - w) ** 2).sum()
        # the error of W R in the rotated frame is the error of the layer: rotating back is orthogonal
        spun = ((rtn.fake_quantize(rotated, bits, 64) - rotated) ** 2).sum()
        assert spun < 0.5 * plain


def test_rotating_the_residual_keeps_the_function(tiny_llama):
    tiny_llama = copy.deepcopy(tiny_llama)  # the fixture is shared by the whole session: rotate a copy
    ids = torch.randint(0, 128, (2, 24))
    for module in tiny_llama.modules():  # norms with real scales, so folding them matters
        if "RMSNorm" in type(module).__name__:
            module.weight.data.uniform_(0.5, 1.5)
    before = tiny_llama(ids).logits
    embedding = tiny_llama.model.embed_tokens.weight.detach().clone()
    r = hadamard.rotate_residual(tiny_llama, seed=1)
    assert torch.allclose(tiny_llama(ids).logits, before, atol=1e-5, rtol=1e-4)
    assert torch.allclose(tiny_llama.model.embed_tokens.weight, (embedding.double() @ r).float())  # really rotated
    assert tiny_llama.lm_head.weight is not tiny_llama.model.embed_tokens.weight  # untied: the head took the final norm


def test_bad_input_is_a_lesson_error():
    with pytest.raises(LessonError, match="power of two"):
        hadamard.sylvester(12)
    with pytest.raises(LessonError, match="Llama-like"):
        hadamard.rotate_residual(torch.nn.Linear(4, 4))
