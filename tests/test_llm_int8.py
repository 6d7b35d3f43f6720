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
