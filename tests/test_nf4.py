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


def test_double_quantization_matches_within_one_8bit_step():
    """bitsandbytes' CPU kernel searches the 8-bit code book with a fixed 7-step binary search, which does
    not always land on the nearest value: a few constants (about 0.1 %) get a neighbouring code. Ours takes
    the nearest, so we allow those few one-code differences and check everything else exactly."""
    torch.manual_seed(0)
    w = torch.randn(512, 1024) * 0.03
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    codes, absmax = nf4.quantize_nf4(w)
    q, absmax2, offset = nf4.double_quantize(absmax, state.state2.code)
    assert torch.equal(absmax2, state.state2.absmax) and offset == state.offset
    differ = q != state.absmax
    assert differ.float().mean() < 0.005
    code = state.state2.code
    assert (code[q[differ].long()] - code[state.absmax[differ].long()]).abs().max() < 0.02  # neighbouring codes
    ours = nf4.dequantize_nf4(codes, nf4.double_dequantize(q, absmax2, offset, code), w.shape)
    theirs = F.dequantize_4bit(packed, state)
    same_blocks = ~differ.repeat_interleave(64).reshape(w.shape)
    assert torch.equal(ours[same_blocks], theirs[same_blocks])


def test_bits_per_weight_accounting_matches_qlora():
    assert nf4.bits_per_weight(64) == 4.5
    assert nf4.bits_per_weight(64, double_quant=True) == pytest.approx(4 + 0.127, abs=1e-3)


def test_blocks_must_divide_the_tensor():
    with pytest.raises(LessonError, match="blocks of 64"):
        nf4.quantize_nf4(torch.randn(10, 10))
