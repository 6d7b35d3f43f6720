"""The from-scratch round-to-nearest quantizer, checked against compressed-tensors and by its properties."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlesson import LessonError
from quantlesson.scratch import rtn


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits,group_size", [(8, None), (4, None), (4, 128), (4, 32), (3, 128), (2, 64)])
def test_codes_and_scales_equal_compressed_tensors(symmetric, bits, group_size):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    torch.manual_seed(bits)
    w = torch.randn(96, 256) * torch.rand(96, 1)  # rows of different ranges
    args = QuantizationArgs(
        num_bits=bits, symmetric=symmetric, strategy="channel" if group_size is None else "group", group_size=group_size
    )
    groups = rtn.grouped(w, group_size)
    lib_scale, lib_zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    lib_codes = quantize(w, lib_scale, lib_zero, args).to(torch.int8)
    codes, scale, zero = rtn.quantize_weight(w, bits, group_size, symmetric)
    assert torch.equal(codes, lib_codes)
    assert torch.equal(scale, lib_scale)
    assert torch.equal(zero, lib_zero.float())


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), symmetric=st.booleans(), seed=st.integers(0, 10_000))
def test_error_is_at_most_half_a_step(bits, symmetric, seed):
    """Without clipping, every weight is within half a quantization step of its restored value."""
    torch.manual_seed(seed)
    w = torch.randn(8, 64)
    q, scale, zero = rtn.quantize_weight(w, bits, None, symmetric)
    restored = rtn.dequantize(q, scale, zero)
    assert ((restored - w).abs() <= scale / 2 + 1e-6).all()
    low, high = rtn.qrange(bits)
    assert q.min() >= low and q.max() <= high


def test_zero_stays_exact():
    w = torch.tensor([[0.0, 0.3, 1.7, 2.2]])  # all non-negative: asymmetric range still includes 0
    assert rtn.fake_quantize(w, 4, symmetric=False)[0, 0] == 0


def test_more_bits_and_smaller_groups_give_less_error():
    torch.manual_seed(0)
    w = torch.randn(64, 512)
    err = lambda **kw: (rtn.fake_quantize(w, **kw) - w).pow(2).mean()
    assert err(bits=3) > err(bits=4) > err(bits=8)
    assert err(bits=4, per_tensor=True) > err(bits=4) > err(bits=4, group_size=128) > err(bits=4, group_size=32)


@settings(max_examples=30, deadline=None)
@given(codes=st.lists(st.integers(-8, 7), min_size=2, max_size=64).filter(lambda c: len(c) % 2 == 0))
def test_pack_int4_round_trips(codes):
    q = torch.tensor([codes], dtype=torch.int8)
    packed = rtn.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.numel() == q.numel() // 2
    assert torch.equal(rtn.unpack_int4(packed), q)


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, True), (4, None, False), (8, 64, True), (3, 128, False)])
def test_quant_linear_computes_with_the_dequantized_weight(bits, group_size, symmetric):
    torch.manual_seed(1)
    linear = torch.nn.Linear(256, 48, bias=True)
    layer = rtn.QuantLinear.from_linear(linear, bits, group_size, symmetric)
    expected_weight = rtn.fake_quantize(linear.weight.detach(), bits, group_size, symmetric)
    assert torch.allclose(layer.dequantized_weight(), expected_weight, atol=1e-6)
    x = torch.randn(5, 256)
    assert torch.allclose(layer(x), torch.nn.functional.linear(x, expected_weight, linear.bias), atol=1e-5)


def test_quantize_model_replaces_all_but_the_head(tiny_llama):
    import copy

    model = rtn.quantize_model(copy.deepcopy(tiny_llama), bits=4, group_size=32)
    kinds = {type(m).__name__ for n, m in model.named_modules() if "proj" in n}
    assert kinds == {"QuantLinear"}
    assert isinstance(model.lm_head, torch.nn.Linear)


def test_bad_bits_and_group_sizes_are_refused_before_anything_changes(tiny_llama):
    import copy

    with pytest.raises(LessonError, match="2 to 8 bits"):
        rtn.quantize_weight(torch.randn(4, 64), bits=9)
    with pytest.raises(LessonError, match="does not divide"):
        rtn.quantize_weight(torch.randn(4, 64), bits=4, group_size=48)
    model = copy.deepcopy(tiny_llama)
    with pytest.raises(LessonError, match="does not divide"):
        rtn.quantize_model(model, bits=4, group_size=96)  # divides nothing here: 64 and 128 columns
    assert not any(isinstance(m, rtn.QuantLinear) for m in model.modules())


def test_fitting_group_size_falls_back_to_a_divisor(capsys):
    class Two(torch.nn.Module):
        def __init__(self, width):
            super().__init__()
            self.a, self.b = torch.nn.Linear(256, 8), torch.nn.Linear(width, 8)

    assert rtn.fitting_group_size(Two(768)) == 128
    assert rtn.fitting_group_size(Two(576)) == 64  # SmolLM2-135M's hidden size
    assert "using groups of 64" in capsys.readouterr().out


def test_all_zero_group_gives_zero_point_0_as_compressed_tensors_does():
    """An all-zero group has range 0: its scale becomes eps and its zero-point 0, not 0/0 = NaN."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import calculate_qparams

    torch.manual_seed(0)
    w = torch.randn(4, 64)
    w[1, 32:] = 0  # one all-zero group
    w[2] = 0  # a whole zero row
    args = QuantizationArgs(num_bits=4, symmetric=False, strategy="group", group_size=32)
    groups = rtn.grouped(w, 32)
    lib_scale, lib_zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    codes, scale, zero = rtn.quantize_weight(w, 4, 32, symmetric=False)
    assert torch.equal(scale, lib_scale) and torch.equal(zero, lib_zero.float())
    restored = rtn.fake_quantize(w, 4, 32, symmetric=False)
    assert torch.isfinite(restored).all()
    assert torch.equal(restored[w == 0], w[w == 0])  # the zeros stay exactly zero


def test_tensors_follow_the_weights_device():
    """Nothing is created on the CPU behind the caller's back: a meta weight gives meta codes, scales and zeros."""
    w = torch.randn(8, 64, device="meta")
    for symmetric in (True, False):
        codes, scale, zero = rtn.quantize_weight(w, 4, 32, symmetric)
        assert {codes.device.type, scale.device.type, zero.device.type} == {"meta"}
        assert rtn.fake_quantize(w, 4, 32, symmetric).device.type == "meta"
    layer = rtn.QuantLinear.from_linear(torch.nn.Linear(64, 8, device="meta"), 4, 32, symmetric=False)
    assert {t.device.type for t in layer.buffers()} == {"meta"}


BAD_INPUTS = [
    (lambda: rtn.quantize_weight(torch.randn(64)), "expected a 2-D weight [out, in]"),
    (lambda: rtn.quantize_weight(torch.randn(2, 8, 64)), "expected a 2-D weight [out, in]"),
    (lambda: rtn.fake_quantize(torch.randn(64)), "per_tensor=True"),
    (lambda: rtn.quantize_weight(torch.randn(4, 64), group_size=0), "positive number of columns"),
    (lambda: rtn.quantize_weight(torch.randn(4, 64), group_size=-32), "positive number of columns"),
    (lambda: rtn.quantize_weight(torch.randn(4, 64), bits=1), "2 to 8 bits"),
    (lambda: rtn.quantize_weight(torch.randn(4, 64), bits=4.5), "2 to 8 bits"),
    (lambda: rtn.quantize_weight(torch.full((4, 64), float("nan"))), "NaN or infinite"),
    (lambda: rtn.quantize_weight(torch.randint(-8, 8, (4, 64))), "floating-point"),
    (lambda: rtn.quantize_weight(torch.zeros(4, 0)), "empty"),
    (lambda: rtn.quantize_weight(torch.randn(4, 64), clip=0.0), "clip"),
    (lambda: rtn.quantize_weight(torch.randn(4, 64), clip=1.5), "clip"),
    (lambda: rtn.pack_int4(torch.zeros(1, 3, dtype=torch.int8)), "even number of codes"),
    (lambda: rtn.QuantLinear.from_linear(torch.nn.Linear(64, 8), bits=9), "2 to 8 bits"),
]


@pytest.mark.parametrize("call,phrase", BAD_INPUTS, ids=range(len(BAD_INPUTS)))
def test_bad_input_is_a_lesson_error_that_says_what_to_do(call, phrase):
    with pytest.raises(LessonError) as caught:
        call()
    assert phrase in str(caught.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_and_scales_on_a_gpu_equal_the_cpus(symmetric):
    """A GPU divides by a Python number through its reciprocal: the scales must divide by a tensor to match."""
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    on_gpu = rtn.quantize_weight(w.cuda(), 4, 32, symmetric)
    for gpu, cpu in zip(on_gpu, rtn.quantize_weight(w, 4, 32, symmetric)):
        assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)
