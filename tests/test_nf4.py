"""NF4 from scratch against bitsandbytes (CPU): levels, codes, absmax and dequantized values."""

import pytest
import torch

from quantlesson import LessonError
from quantlesson.scratch import nf4

F = pytest.importorskip("bitsandbytes.functional")

# The levels printed in the QLoRA paper (Dettmers et al. 2023, appendix E), to 4 decimals.
QLORA_LEVELS = [-1, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0, 0.0796, 0.1609, 0.2461, 0.3379,
                0.4407, 0.5626, 0.7230, 1]


def test_derived_levels_are_bitsandbytes_table_and_the_papers():
    levels = nf4.nf4_levels()
    assert torch.equal(levels, F.get_4bit_type("nf4", device="cpu"))
    assert torch.allclose(levels, torch.tensor(QLORA_LEVELS), atol=5e-5)


@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_codes_absmax_and_dequantized_values_are_bit_exact(blocksize, dtype):
    torch.manual_seed(blocksize)
    w = (torch.randn(128, 512) * 0.02).to(dtype)
    packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    codes, absmax = nf4.quantize_nf4(w, blocksize)
    assert torch.equal(nf4.pack(codes), packed.reshape(-1))
    assert torch.equal(absmax, state.absmax)
    ours = nf4.dequantize_nf4(codes, absmax, w.shape, blocksize)
    assert torch.equal(ours.to(dtype), F.dequantize_4bit(packed, state))


@pytest.mark.parametrize("seed,scale,shape", [(0, 0.03, (512, 1024)), (1, 0.02, (1024, 1024)), (2, 1.0, (300, 64 * 64)),
                                              (3, 0.01, (768, 2048))])  # fmt: skip
def test_double_quantization_is_bit_exact(seed, scale, shape):
    """The 8-bit constants, their scales and offset, and so every dequantized weight, equal bitsandbytes'."""
    torch.manual_seed(seed)
    w = torch.randn(shape) * scale
    w[0, :64] = 0  # an all-zero block: absmax 0
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    codes, absmax = nf4.quantize_nf4(w)
    q, absmax2, offset = nf4.double_quantize(absmax, state.state2.code)
    assert torch.equal(absmax2, state.state2.absmax) and offset == state.offset
    assert torch.equal(q, state.absmax)
    ours = nf4.dequantize_nf4(codes, nf4.double_dequantize(q, absmax2, offset, state.state2.code), w.shape)
    assert torch.equal(ours, F.dequantize_4bit(packed, state))


def test_8bit_blockwise_codes_equal_bitsandbytes():
    torch.manual_seed(0)
    x = torch.randn(10_000) * torch.rand(10_000)
    x[256:512] = 0  # an all-zero block
    codes, absmax = nf4.quantize_blockwise_8bit(x, F.create_dynamic_map(), blocksize=256)
    lib_codes, state = F.quantize_blockwise(x, blocksize=256)
    assert torch.equal(codes, lib_codes) and torch.equal(absmax, state.absmax)


def test_8bit_lookup_rounds_to_the_nearest_code_except_next_to_a_midpoint():
    """The lookup table's grid is 2/65535 wide: only values that close to a midpoint can get the neighbouring code."""
    code = F.create_dynamic_map(signed=True)
    x = torch.linspace(-1, 1, 100_001)
    q, _ = nf4.quantize_blockwise_8bit(x, code, blocksize=x.numel())
    nearest = (x[:, None] - code[None, :]).abs().argmin(1)
    differ = q.long() != nearest
    midpoints = (code[q[differ].long()] + code[nearest[differ]]) / 2
    assert ((x[differ] - midpoints).abs() <= 2 / 65535).all() and differ.float().mean() < 0.01


def test_pack_pads_an_odd_count_as_bitsandbytes_does():
    """bitsandbytes pads an odd number of values with a 0.0 (code 7) before packing two per byte."""
    torch.manual_seed(0)
    w = torch.randn(63)  # one partial block of 63 values
    packed, _ = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    codes, _ = nf4.quantize_nf4(torch.cat([w, torch.zeros(1)]))  # a zero does not change the block's absmax
    assert torch.equal(nf4.pack(codes[:63]), packed.reshape(-1))


def test_tables_follow_the_weights_device():
    """The level table is made where the weights are: meta weights give meta codes and values."""
    w = torch.randn(4, 64, device="meta")
    codes, absmax = nf4.quantize_nf4(w)
    assert codes.device.type == absmax.device.type == "meta"
    assert nf4.dequantize_nf4(codes, absmax, w.shape).device.type == "meta"
    assert nf4.nf4_levels(device="meta").device.type == "meta"


def test_bits_per_weight_accounting_matches_qlora():
    assert nf4.bits_per_weight(64) == 4.5
    assert nf4.bits_per_weight(64, double_quant=True) == pytest.approx(4 + 0.127, abs=1e-3)


def test_blocks_must_divide_the_tensor():
    with pytest.raises(LessonError, match="blocks of 64"):
        nf4.quantize_nf4(torch.randn(10, 10))


BAD_INPUTS = [
    (lambda: nf4.quantize_nf4(torch.randn(4, 64), blocksize=0), "power of two"),
    (lambda: nf4.quantize_nf4(torch.randn(4, 64), blocksize=-64), "power of two"),
    (lambda: nf4.quantize_nf4(torch.randn(4, 96), blocksize=48), "power of two"),
    (lambda: nf4.quantize_nf4(torch.full((4, 64), float("nan"))), "NaN or infinite"),
    (lambda: nf4.quantize_nf4(torch.randint(-8, 8, (4, 64))), "floating-point"),
    (lambda: nf4.quantize_nf4(torch.zeros(0, 64)), "empty"),
    (lambda: nf4.dequantize_nf4(torch.zeros(128, dtype=torch.uint8), torch.ones(2), (4, 64)), "do not match"),
    (lambda: nf4.dequantize_nf4(torch.zeros(128, dtype=torch.uint8), torch.ones(3), (2, 64)), "absmax"),
    (lambda: nf4.quantize_blockwise_8bit(torch.randn(512), torch.linspace(-1, 1, 16)), "256 values"),
    (lambda: nf4.quantize_blockwise_8bit(torch.randn(512), F.create_dynamic_map(), blocksize=0), "positive"),
    (lambda: nf4.double_quantize(torch.zeros(0), F.create_dynamic_map()), "empty"),
]


@pytest.mark.parametrize("call,phrase", BAD_INPUTS, ids=range(len(BAD_INPUTS)))
def test_bad_input_is_a_lesson_error_that_says_what_to_do(call, phrase):
    with pytest.raises(LessonError) as caught:
        call()
    assert phrase in str(caught.value)
