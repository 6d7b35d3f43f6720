"""FP8 weights from scratch, checked against compressed-tensors' FP8, FP8_DYNAMIC and FP8_BLOCK schemes."""

import pytest
import torch

from quantlesson import LessonError
from quantlesson.scratch import fp8

PRESETS = {"tensor": "FP8", "channel": "FP8_DYNAMIC", "block": "FP8_BLOCK"}


def weight(rows: int = 200, cols: int = 300) -> torch.Tensor:
    """Not a multiple of 128 either way (blocks are padded), rows of different ranges, one all-zero row."""
    torch.manual_seed(0)
    w = torch.randn(rows, cols) * torch.rand(rows, 1)
    w[7] = 0.0
    return w


def library_minmax(w: torch.Tensor, granularity: str):
    if granularity == "tensor":
        return w.amin().reshape(1), w.amax().reshape(1)
    if granularity == "channel":
        return w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    blocks = fp8.as_blocks(w)
    return blocks.amin(-1), blocks.amax(-1)


@pytest.mark.parametrize("granularity", PRESETS)
def test_codes_and_scales_equal_compressed_tensors(granularity):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import preset_name_to_scheme, quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    w = weight()
    args = preset_name_to_scheme(PRESETS[granularity], ["Linear"]).weights
    scale, zero = calculate_qparams(*library_minmax(w, granularity), args)
    theirs = quantize(w, scale, zero, args, dtype=torch.float8_e4m3fn)
    codes, ours = fp8.quantize_weight(w, granularity)
    assert torch.equal(ours, scale.float().reshape(ours.shape))
    assert torch.equal(codes, theirs.view(torch.uint8))


@pytest.mark.parametrize("granularity", PRESETS)
def test_dequantize_equals_pytorchs_float8_times_the_scale(granularity):
    w = weight()
    codes, scale = fp8.quantize_weight(w, granularity)
    restored = fp8.dequantize(codes, scale, granularity)
    assert torch.equal(restored, codes.view(torch.float8_e4m3fn).float() * fp8.expand(scale, w.shape, granularity))
    relative = (restored - w).abs() / w.abs().clamp(min=1e-30)
    normal = w.abs() >= 2.0**-6 * fp8.expand(scale, w.shape, granularity)  # above E4M3's subnormals
    assert relative[normal].max() <= 2.0**-4  # 3 mantissa bits: at most half a step, 1/16 of the value


def test_fp8s_error_hardly_depends_on_the_scale_granularity_unlike_int8s():
    """Floating point keeps ~3 significant bits at any magnitude: rows of small range lose little under one scale
    per tensor, where INT8's uniform grid gives them few levels."""
    from quantlesson.scratch import rtn

    w = weight()
    errors = {g: ((fp8.fake_quantize(w, g) - w) ** 2).mean().item() for g in PRESETS}
    assert max(errors.values()) < 1.05 * min(errors.values())
    int8 = {g: ((rtn.fake_quantize(w, 8, per_tensor=(g == "tensor")) - w) ** 2).mean().item() for g in ("tensor", "channel")}
    assert int8["tensor"] > 2 * int8["channel"]


@pytest.mark.parametrize("call,phrase", [
    (lambda: fp8.quantize_weight(torch.randn(4, 4), "group"), "granularity"),
    (lambda: fp8.quantize_weight(torch.randn(8), "tensor"), "2-D weight"),
    (lambda: fp8.quantize_weight(torch.tensor([[1.0, float("inf")]]), "tensor"), "infinite"),
])
def test_bad_input_is_a_lesson_error_that_says_what_to_do(call, phrase):
    with pytest.raises(LessonError, match=phrase):
        call()
