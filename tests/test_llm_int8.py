"""LLM.int8() from scratch against bitsandbytes' int8 path (CPU)."""

import pytest
import torch

from quantlesson.scratch import llm_int8

pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as F  # noqa: E402


@pytest.fixture(scope="module")
def with_outliers():
    torch.manual_seed(0)
    X = torch.randn(64, 512)
    X[:, [7, 300]] *= 25  # two outlier features, as large models develop
    W = torch.randn(256, 512) * 0.05
    return X, W


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_codes_scales_and_outlier_columns_equal_bitsandbytes(with_outliers, threshold):
    X, _ = with_outliers
    codes, absmax, columns = llm_int8.vectorwise_quantize(X, threshold)
    lib_codes, lib_absmax, lib_columns = F.int8_vectorwise_quant(X.clone(), threshold)
    assert torch.equal(codes, lib_codes) and torch.equal(absmax, lib_absmax)
    if threshold:
        assert torch.equal(columns, lib_columns) and set(columns.tolist()) >= {7, 300}


def test_output_matches_bitsandbytes_mixed_matmul(with_outliers):
    X, W = with_outliers
    CA, SCA, columns = F.int8_vectorwise_quant(X.clone(), 6.0)
    CB, SCB, _ = F.int8_vectorwise_quant(W.clone())
    lib, _ = torch.ops.bitsandbytes.int8_mixed_scaled_mm(X, CA, CB, SCA, SCB, columns, None)
    ours = llm_int8.int8_matmul(X, W, threshold=6.0)
    assert torch.allclose(ours, lib.float(), rtol=1e-5, atol=1e-4)


def test_decomposition_rescues_the_outliers(with_outliers):
    X, W = with_outliers
    exact = X @ W.T
    error = lambda threshold: ((llm_int8.int8_matmul(X, W, threshold) - exact).norm() / exact.norm()).item()
    assert error(6.0) < error(0.0) / 3  # without the decomposition the outliers set every row's scale


def test_bits_per_weight_counts_what_bitsandbytes_stores(embedded, tmp_path):
    """int8 codes plus bitsandbytes' per-row float32 scales (``SCB``), on the embedded model loaded in 8 bits."""
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    from quantlesson import models

    model, tokenizer = embedded
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    int8, _ = models.load(str(tmp_path), quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu",
                          dtype=torch.float16)  # fmt: skip
    layers = [m for m in int8.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    stored = sum(m.weight.numel() * m.weight.element_size() + m.weight.SCB.numel() * m.weight.SCB.element_size() for m in layers)
    weights = sum(m.in_features * m.out_features for m in layers)
    assert len(layers) == 7 * len(models.decoder_layers(int8))
    assert llm_int8.bits_per_weight(layers) == pytest.approx(8 * stored / weights)


def test_leading_dimensions_are_flattened_into_rows(with_outliers):
    """Activations [batch, tokens, features]: each token is a row, scaled over its features."""
    X, W = with_outliers
    X3 = X.reshape(4, 16, 512)
    codes, absmax, columns = llm_int8.vectorwise_quantize(X3, 6.0)
    lib_codes, lib_absmax, lib_columns = F.int8_vectorwise_quant(X.clone(), 6.0)
    assert torch.equal(codes, lib_codes.reshape(4, 16, 512)) and torch.equal(absmax, lib_absmax.reshape(4, 16))
    assert torch.equal(columns, lib_columns)
    assert torch.equal(llm_int8.int8_matmul(X3, W), llm_int8.int8_matmul(X, W).reshape(4, 16, 256))


def test_an_all_zero_row_gets_codes_0():
    A = torch.randn(3, 64)
    A[1] = 0
    codes, absmax, _ = llm_int8.vectorwise_quantize(A)
    assert absmax[1] == 0 and (codes[1] == 0).all()


BAD_INPUTS = [
    (lambda: llm_int8.vectorwise_quantize(torch.randn(64)), "expected a 2-D weight [out, in]"),
    (lambda: llm_int8.int8_matmul(torch.randn(4, 64), torch.randn(64)), "expected a 2-D weight [out, in]"),
    (lambda: llm_int8.int8_matmul(torch.randn(4, 64), torch.randn(8, 32)), "64 features"),
    (lambda: llm_int8.vectorwise_quantize(torch.randn(4, 64), threshold=-1.0), "threshold"),
    (lambda: llm_int8.vectorwise_quantize(torch.full((4, 64), float("nan"))), "NaN or infinite"),
    (lambda: llm_int8.vectorwise_quantize(torch.randint(-8, 8, (4, 64))), "floating-point"),
    (lambda: llm_int8.vectorwise_quantize(torch.zeros(0, 64)), "empty"),
    (lambda: llm_int8.bits_per_weight([]), "no layers"),
]


@pytest.mark.parametrize("call,phrase", BAD_INPUTS, ids=range(len(BAD_INPUTS)))
def test_bad_input_is_a_lesson_error_that_says_what_to_do(call, phrase):
    from quantlesson import LessonError

    with pytest.raises(LessonError) as caught:
        call()
    assert phrase in str(caught.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_int8_matmul_runs_on_a_gpu(with_outliers):
    """CUDA has no int32 matrix product: the integer sums are taken in float64 there, exactly."""
    X, W = with_outliers
    qx, qw = llm_int8.vectorwise_quantize(X)[0], llm_int8.vectorwise_quantize(W)[0]
    assert torch.equal(llm_int8.int_matmul(qx.cuda(), qw.cuda()).cpu(), llm_int8.int_matmul(qx, qw))
    assert torch.allclose(llm_int8.int8_matmul(X.cuda(), W.cuda()).cpu(), llm_int8.int8_matmul(X, W), rtol=1e-5, atol=1e-4)
