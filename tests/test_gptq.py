"""The from-scratch GPTQ, checked code for code against llm-compressor's GPTQ on the same layer and Hessian."""

import copy
import os

import pytest
import torch

from quantlesson import LessonError
from quantlesson.scratch import gptq, rtn


def llmcompressor_codes(W, H, bits, group_size, symmetric, act_order):
    """llm-compressor's GPTQ on one weight matrix, turned back into integer codes.

    Its observer computes the scales in the weight's dtype (bfloat16 for a bfloat16 W),
    and its GPTQ dequantizes with them in that dtype; the codes are recovered in float32.
    """
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
    from llmcompressor.observers import Observer

    args = QuantizationArgs(
        num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group_size,
        actorder="static" if act_order else None,
    )
    qparams = Observer.load_from_registry("memoryless_minmax", base_name="weight", args=args)(W).get_qparams()
    scale, zero = qparams["scale"], qparams["zero_point"]
    # quantize_weight works in place on float32 copies of its inputs: give it copies.
    Wq, _, used_rtn = quantize_weight(W.clone()[None], H.clone()[None], scale[None], zero[None], None, args, blocksize=128, percdamp=0.01)
    assert not used_rtn.any()
    g = torch.arange(W.shape[1]) // group_size
    codes = torch.round(Wq[0].float() / scale[:, g].float()) + zero[:, g].float()
    return codes.to(torch.int8), scale, zero


def gptqmodel_codes(W, H, bits, group_size, symmetric, act_order, damp=0.05):
    """GPTQModel's own GPTQ (its ``GPTQ.quantize``) on one weight matrix and Hessian, turned into this lesson's codes.

    Its defaults but for the ones named: dynamic groups (``static_groups=False``),
    ``desc_act=False``, group-aware act-order as asked. Its codes are unsigned
    (0..15 around a zero-point of 8 when symmetric): shifting by ``2**(bits-1)`` gives ours.
    """
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel.quantization.config import QuantizeConfig
    from gptqmodel.quantization.gptq import GPTQ

    linear = torch.nn.Linear(W.shape[1], W.shape[0], bias=False, dtype=W.dtype)
    linear.weight.data = W.clone()
    config = QuantizeConfig(
        bits=bits, group_size=group_size, sym=symmetric, desc_act=False, act_group_aware=act_order,
        static_groups=False, damp_percent=damp,
    )
    task = GPTQ(linear, config)
    task.quantizer.configure(perchannel=True)  # as GPTQModel's GPTQProcessor does
    task.H, task.nsamples = H.clone(), 10_000  # our Hessian, and enough samples that no fallback applies
    task.finalize_hessian = lambda target_device=None: task.H
    Wq, scale, zero, g_idx, *_ = task.quantize(blocksize=128)
    assert torch.equal(g_idx, torch.arange(W.shape[1], dtype=torch.int32) // group_size)  # contiguous groups
    g = torch.arange(W.shape[1]) // group_size
    codes = torch.round(Wq.float() / scale[:, g]) + zero[:, g]
    offset = 2 ** (bits - 1)
    return (codes - offset).to(torch.int8), scale, zero - offset


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


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_bfloat16_weights_keep_llmcompressors_bfloat16_scales(layer_and_hessian, symmetric, act_order):
    """Static groups take their scales in the weight's dtype, as llm-compressor does, and dequantize with them.

    Scales computed in float32 (the old code) differ from bfloat16 ones in the last bits,
    and so do the errors GPTQ spreads: some codes would come out different.
    """
    W, H = layer_and_hessian
    W = W.to(torch.bfloat16)
    lib_codes, lib_scale, lib_zero = llmcompressor_codes(W, H, 4, 128, symmetric, act_order)
    codes, scale, zero = gptq.gptq(W, H, bits=4, group_size=128, symmetric=symmetric, act_order=act_order)
    assert scale.dtype == torch.bfloat16 and torch.equal(scale, lib_scale)
    assert torch.equal(zero.float(), lib_zero.float())
    assert torch.equal(codes, lib_codes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size", [128, 32])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (3, True)])
def test_dynamic_groups_equal_gptqmodel(layer_and_hessian, bits, symmetric, act_order, group_size, dtype):
    """``static_groups=False`` is GPTQModel's GPTQ: the same codes, scales and zero-points, exactly (on the CPU).

    Groups of 32 start inside the blocks of 128 columns: both refit them from the weights
    as updated up to the block's start. GPTQModel works in float32 whatever the weight's
    dtype, and so does this mode. (On a GPU GPTQModel runs a fused CUDA block update that
    sums in another order: compare on the CPU, or expect a few codes to differ where a
    weight lies within float rounding of halfway between two levels.)
    """
    W, H = layer_and_hessian
    W = W.to(dtype)
    lib_codes, lib_scale, lib_zero = gptqmodel_codes(W, H, bits, group_size, symmetric, act_order)
    codes, scale, zero = gptq.gptq(
        W, H, bits=bits, group_size=group_size, symmetric=symmetric, act_order=act_order, percdamp=0.05, static_groups=False,
    )
    assert torch.equal(scale, lib_scale) and torch.equal(zero, lib_zero)
    assert torch.equal(codes, lib_codes)
    _, static_scale, _ = gptq.gptq(W, H, bits=bits, group_size=group_size, symmetric=symmetric, act_order=act_order, percdamp=0.05)
    assert not torch.equal(scale, static_scale.float())  # the refit scales are not the original weights' scales


def test_column_order():
    h = torch.tensor([1.0, 5.0, 2.0, 3.0, 9.0, 0.0, 4.0, 0.5])  # H_ii of 8 columns, groups of 4
    assert gptq.column_order(h, 4, act_order=False, static_groups=True).tolist() == list(range(8))
    assert gptq.column_order(h, 4, act_order=True, static_groups=True).tolist() == [4, 1, 6, 3, 2, 0, 7, 5]
    # Dynamic groups keep groups whole: the group holding 9.0 first, each group's columns by H_ii.
    assert gptq.column_order(h, 4, act_order=True, static_groups=False).tolist() == [4, 6, 7, 5, 1, 3, 2, 0]


@pytest.mark.parametrize("static_groups", [True, False])
def test_gptq_beats_round_to_nearest_on_the_layer_output(layer_and_hessian, static_groups):
    W, H = layer_and_hessian
    def output_error(codes, scale, zero):
        delta = rtn.dequantize(rtn.grouped(codes, 128), scale[..., None], zero[..., None]).reshape(W.shape) - W
        return torch.trace(delta @ H @ delta.T).item()  # = ||(W - Q) X^T||^2 up to the factor 2/n
    gptq_error = output_error(*gptq.gptq(W, H, bits=4, group_size=128, static_groups=static_groups))
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
    with pytest.raises(LessonError, match="weight matrix"):
        gptq.gptq(W[0], H, bits=4)  # one row, as a 1-D tensor


def test_unusable_hessians_get_a_clear_error(layer_and_hessian):
    """A NaN Hessian or one that dampening cannot make positive definite: a LessonError that says what to do."""
    W, H = layer_and_hessian
    nan = H.clone()
    nan[3, 5] = float("nan")
    with pytest.raises(LessonError, match="NaN or infinite"):
        gptq.gptq(W, nan, bits=4)
    indefinite = H - 2 * torch.linalg.eigvalsh(H).max() * torch.eye(H.shape[0])  # every eigenvalue negative
    with pytest.raises(LessonError, match="raise percdamp"):
        gptq.gptq(W, indefinite, bits=4)


@pytest.mark.parametrize("static_groups", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_work_follows_the_weights_device(layer_and_hessian, static_groups, act_order):
    """Every tensor gptq makes is on W's device: with "meta" as the default device, one made without it breaks the run."""
    W, H = layer_and_hessian
    expected = gptq.gptq(W, H, bits=4, group_size=32, act_order=act_order, static_groups=static_groups)
    with torch.device("meta"):
        result = gptq.gptq(W, H, bits=4, group_size=32, act_order=act_order, static_groups=static_groups)
        H_sum, n = gptq.add_to_hessian(torch.zeros(256, 256), 0, torch.ones(2, 3, 256))  # sums on H's device
    assert H_sum.device.type == "meta" and n == 2
    for mine, theirs in zip(result, expected):
        assert mine.device.type == "cpu" and torch.equal(mine, theirs)


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


def test_whole_model_hessians_stay_on_the_layers_device(tiny_llama):
    """quantize_model sums each Hessian on its layer's device (the old code summed on the CPU, whatever the device)."""
    calibration = torch.randint(0, 128, (8, 64), generator=torch.Generator().manual_seed(0))
    expected = gptq.quantize_model(copy.deepcopy(tiny_llama), calibration, bits=4, group_size=32, progress=False)
    with torch.device("meta"):  # a tensor made without the layer's device lands here and cannot meet the CPU model
        result = gptq.quantize_model(copy.deepcopy(tiny_llama), calibration, bits=4, group_size=32, progress=False)
    for (name, mine), theirs in zip(result.state_dict().items(), expected.state_dict().values()):
        assert mine.device.type == "cpu" and torch.equal(mine, theirs), name


def test_whole_model_error_names_the_layer(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[0, 0] = float("nan")  # o_proj's inputs become NaN
    with pytest.raises(LessonError, match="Decoder layer 0, self_attn.o_proj: The Hessian has NaN"):
        gptq.quantize_model(model, torch.randint(0, 128, (8, 64)), bits=4, group_size=32, progress=False)


def test_too_few_calibration_tokens_are_refused(tiny_llama):
    with pytest.raises(LessonError, match="too few"):
        gptq.quantize_model(copy.deepcopy(tiny_llama), torch.randint(0, 128, (2, 16)), bits=4, group_size=32)
    with pytest.raises(LessonError, match="shape"):
        gptq.quantize_model(copy.deepcopy(tiny_llama), torch.randint(0, 128, (512,)), bits=4, group_size=32)
