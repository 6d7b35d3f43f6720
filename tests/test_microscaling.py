"""MXFP4 and NVFP4 from scratch, checked byte for byte against llama.cpp's gguf package and compressed-tensors."""

import numpy as np
import pytest
import torch

from quantlesson import LessonError
from quantlesson.scratch import microscaling as mx
from quantlesson.scratch import minifloat as mf


def weight(rows: int = 128, cols: int = 512, seed: int = 0) -> torch.Tensor:
    """Rows of different ranges, one outlier, a zero block, and values that fall exactly on E2M1 ties."""
    torch.manual_seed(seed)
    w = torch.randn(rows, cols) * torch.rand(rows, 1) * 0.05
    w[3, 7] = 1.3
    w[5, :32] = 0.0
    w[6, :32] = torch.tensor([4.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] * 4)  # amax 4: scale 1, so these are ties
    return w


def test_mxfp4_bytes_equal_llama_cpps():
    gguf = pytest.importorskip("gguf")
    w = weight()
    codes, exponent = mx.mxfp4_quantize(w, exponent_rule="floor", ties="toward-zero")
    theirs = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.MXFP4)
    assert np.array_equal(mx.gguf_mxfp4_bytes(codes, exponent).numpy(), theirs)
    back = gguf.quants.dequantize(theirs, gguf.GGMLQuantizationType.MXFP4)
    assert np.array_equal(mx.mxfp4_dequantize(codes, exponent).numpy(), back)


def test_llama_cpp_breaks_ties_toward_zero_so_round_to_even_differs_there():
    gguf = pytest.importorskip("gguf")
    w = weight()
    theirs = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.MXFP4)
    even = mx.gguf_mxfp4_bytes(*mx.mxfp4_quantize(w, "floor", "even")).numpy()
    assert not np.array_equal(even, theirs)  # the planted ties of row 6 decide it
    assert np.array_equal(np.delete(even, 6, axis=0), np.delete(theirs, 6, axis=0))


def qparams(w: torch.Tensor, preset: str, block: int):
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    args = preset_name_to_scheme(preset, ["Linear"]).weights
    groups = w.unflatten(-1, (-1, block))
    g = generate_gparam(w.amin(), w.amax()) if preset.startswith("NV") else None
    scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args, global_scale=g)
    return args, scale, zero, g


def test_mxfp4_equals_compressed_tensors_with_its_round_up_exponent():
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.mx_utils import compress_mx_scale
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
    from compressed_tensors.quantization import quantize

    w = weight()
    args, scale, zero, _ = qparams(w, "MXFP4A16", mx.MX_BLOCK)
    codes, exponent = mx.mxfp4_quantize(w, exponent_rule="round-up", ties="even")
    assert torch.equal(compress_mx_scale(scale, torch.uint8).to(torch.int32), exponent + mx.E8M0_BIAS)
    assert torch.equal(mx.pack_fp4(codes), pack_fp4_to_uint8(quantize(w, scale, zero, args)))


def test_the_two_exponent_rules_differ_exactly_where_amax_has_a_mantissa_of_at_least_1_75():
    w = weight()
    amax = w.reshape(w.shape[0], -1, 32).abs().amax(-1)
    floor, up = mx.mx_exponent(amax, "floor"), mx.mx_exponent(amax, "round-up")
    mantissa = amax / torch.exp2(torch.floor(torch.log2(amax)))
    assert torch.equal(up != floor, (mantissa >= 1.75) & (amax > 0))
    assert torch.all((up - floor >= 0) & (up - floor <= 1))


def test_nvfp4_equals_compressed_tensors():
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
    from compressed_tensors.quantization import quantize

    w = weight()
    args, scale, zero, g = qparams(w, "NVFP4A16", mx.NV_BLOCK)
    codes, ours_scale, ours_g = mx.nvfp4_quantize(w)
    assert torch.equal(ours_g.reshape(()), g.reshape(()))
    assert torch.equal(ours_scale, scale.float())
    assert torch.equal(mx.pack_fp4(codes), pack_fp4_to_uint8(quantize(w, scale, zero, args, global_scale=g)))


def test_nvfp4_block_scales_lie_on_e4m3s_grid_and_reach_its_top():
    codes, scale, g = mx.nvfp4_quantize(weight())
    assert torch.equal(mf.round_to(scale, mf.E4M3), scale)
    assert scale.max() == mf.E4M3.max  # the block holding the tensor's largest weight


@pytest.mark.parametrize("fmt,bits", [("mxfp4", 4.25), ("nvfp4", 4.5)])
def test_error_stays_within_half_a_step_of_each_block_below_saturation(fmt, bits):
    w = weight()
    restored = mx.fake_quantize(w, fmt)
    block = mx.MX_BLOCK if fmt == "mxfp4" else mx.NV_BLOCK
    amax = w.reshape(w.shape[0], -1, block).abs().amax(-1)
    # E2M1's coarsest step is 2 (between 4 and 6), a third of its range: the error is at most amax / 3,
    # and more for MXFP4's floor rule, which saturates the top of a block at 6 / 8 of amax.
    bound = amax / 3 if fmt == "nvfp4" else amax / 4 + amax / 8
    error = (restored - w).abs().reshape(amax.shape[0], amax.shape[1], block).amax(-1)
    assert torch.all(error <= bound * 1.001 + 1e-12)


def test_nvfp4_beats_mxfp4_on_a_weight_with_outliers():
    w = weight()
    errors = {fmt: ((mx.fake_quantize(w, fmt) - w) ** 2).mean() for fmt in ("mxfp4", "nvfp4")}
    assert errors["nvfp4"] < errors["mxfp4"]


@pytest.mark.parametrize("call,phrase", [
    (lambda: mx.mxfp4_quantize(torch.randn(4, 48)), "multiple of the format's block of 32"),
    (lambda: mx.nvfp4_quantize(torch.randn(4, 8)), "block of 16"),
    (lambda: mx.nvfp4_quantize(torch.randn(64)), "2-D weight"),
    (lambda: mx.mxfp4_quantize(torch.randn(4, 32), exponent_rule="ceil"), "exponent_rule"),
    (lambda: mx.fake_quantize(torch.randn(4, 32), "fp8"), "scratch.fp8"),
])
def test_bad_input_is_a_lesson_error_that_says_what_to_do(call, phrase):
    with pytest.raises(LessonError, match=phrase):
        call()
