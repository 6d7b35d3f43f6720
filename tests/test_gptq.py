"""The from-scratch GPTQ, checked code for code against llm-compressor's GPTQ on the same layer and Hessian."""

import copy

import pytest
import torch

from quantlesson import LessonError
from quantlesson.scratch import gptq, rtn


def llmcompressor_codes(W, H, bits, group_size, symmetric, act_order):
    """llm-compressor's GPTQ on one weight matrix, turned back into integer codes."""
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
    from llmcompressor.observers import Observer

    args = QuantizationArgs(
        num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group_size,
        actorder="static" if act_order else None,
    )
    qparams = Observer.load_from_registry("memoryless_minmax", base_name="weight", args=args)(W).get_qparams()
    scale, zero = qparams["scale"], qparams["zero_point"]
    # quantize_weight works in place on float32 inputs: give it copies.
    Wq, _, used_rtn = quantize_weight(W.clone()[None], H.clone()[None], scale[None], zero[None], None, args, blocksize=128, percdamp=0.01)
    assert not used_rtn.any()
    g = torch.arange(W.shape[1]) // group_size
    codes = torch.round(Wq[0] / scale[:, g]) + zero[:, g].float()
    return codes.to(torch.int8), scale, zero


@pytest.fixture(scope="module")
def layer_and_hessian():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 384, bias=False)
    # Correlated inputs (as real activations are) with uneven scales (so act-order reorders the columns).
    X = (torch.randn(4, 512, 256) @ torch.randn(256, 256) / 16 + 0.1 * torch.randn(4, 512, 256)) * (torch.rand(256) * 3)
    H, n = gptq.add_to_hessian(torch.zeros(256, 256), 0, X)
    return linear.weight.detach().clone(), H / n


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (3, True), (8, True)])
def test_codes_equal_llmcompressor(layer_and_hessian, bits, symmetric, act_order):
    W, H = layer_and_hessian
    lib_codes, lib_scale, lib_zero = llmcompressor_codes(W, H, bits, 128, symmetric, act_order)
    codes, scale, zero = gptq.gptq(W, H, bits=bits, group_size=128, symmetric=symmetric, act_order=act_order)
    assert torch.equal(scale, lib_scale) and torch.equal(zero, lib_zero.float())
    assert torch.equal(codes, lib_codes)


def test_gptq_beats_round_to_nearest_on_the_layer_output(layer_and_hessian):
    W, H = layer_and_hessian
    def output_error(codes, scale, zero):
        delta = rtn.dequantize(rtn.grouped(codes, 128), scale[..., None], zero[..., None]).reshape(W.shape) - W
        return torch.trace(delta @ H @ delta.T).item()  # = ||(W - Q) X^T||^2 up to the factor 2/n
    gptq_error = output_error(*gptq.gptq(W, H, bits=4, group_size=128))
    rtn_error = output_error(*rtn.quantize_weight(W, 4, 128))
    assert gptq_error < 0.75 * rtn_error


def test_dead_columns_are_zeroed(layer_and_hessian):
    W, H = layer_and_hessian
    H = H.clone()
    H[:, 7] = H[7, :] = 0  # input 7 never active
    codes, scale, zero = gptq.gptq(W, H, bits=4, group_size=128)
    assert (codes[:, 7] == 0).all()


def test_bad_input_is_refused(layer_and_hessian):
    W, H = layer_and_hessian
    with pytest.raises(LessonError, match="does not divide"):
        gptq.gptq(W, H, bits=4, group_size=100)
    with pytest.raises(LessonError, match="2 to 8 bits"):
        gptq.gptq(W, H, bits=1)
    with pytest.raises(LessonError, match="Hessian"):
        gptq.gptq(W, H[:128, :128], bits=4)


def test_whole_model_gptq_replaces_every_layer_and_beats_rtn(tiny_llama):
    from quantlesson import evaluate

    torch.manual_seed(0)
    calibration = torch.randint(0, 128, (8, 64))
    ids = torch.randint(0, 128, (400,))
    ref = evaluate.reference(tiny_llama, ids, window=64, stride=32, progress=False)
    g = gptq.quantize_model(copy.deepcopy(tiny_llama), calibration, bits=3, group_size=32, progress=False)
    r = rtn.quantize_model(copy.deepcopy(tiny_llama), bits=3, group_size=32)
    assert all(isinstance(m, rtn.QuantLinear) for n, m in g.named_modules() if n.endswith("proj"))
    assert evaluate.kl_divergence(g, ref, progress=False) < evaluate.kl_divergence(r, ref, progress=False)


def test_too_few_calibration_tokens_are_refused(tiny_llama):
    with pytest.raises(LessonError, match="too few"):
        gptq.quantize_model(copy.deepcopy(tiny_llama), torch.randint(0, 128, (2, 16)), bits=4, group_size=32)
    with pytest.raises(LessonError, match="shape"):
        gptq.quantize_model(copy.deepcopy(tiny_llama), torch.randint(0, 128, (512,)), bits=4, group_size=32)
