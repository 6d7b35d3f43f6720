"""The from-scratch AWQ, checked against llm-compressor's AWQModifier on the same model and calibration data."""

import copy
import math

import pytest
import torch

from quantlesson import LessonError, compat, data
from quantlesson.scratch import awq, rtn


@pytest.fixture(scope="module")
def calibration(embedded):
    _, tokenizer = embedded
    return data.calibration_tokens(tokenizer, n=16, seq_len=256)


@pytest.fixture(scope="module", params=[False, True], ids=["asymmetric", "symmetric"])
def both(embedded, calibration, request):
    """The embedded model through the from-scratch AWQ and through llm-compressor's, with the same settings.

    Symmetric too: a near tie between two candidates' errors flips the choice when the scales
    differ by float rounding, as ``w_mean`` normalised in float64 (llm-compressor: the weight's
    dtype) made them; :func:`test_w_mean_is_llmcompressors` checks those dtypes bit for bit.
    """
    model, tokenizer = embedded
    symmetric = request.param
    ours = copy.deepcopy(model)
    searches = awq.quantize_model(ours, calibration, bits=4, group_size=128, symmetric=symmetric, n_grid=20, progress=False)

    compat.llmcompressor_awq_on_cpu()
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    library = copy.deepcopy(model)
    oneshot(
        model=library, dataset=data.calibration_dataset(tokenizer, n=16, seq_len=256), num_calibration_samples=16,
        max_seq_length=256, shuffle_calibration_samples=False,
        recipe=[
            AWQModifier(n_grid=20),
            QuantizationModifier(targets="Linear", scheme="W4A16" if symmetric else "W4A16_ASYM", ignore=["lm_head"]),
        ],
    )
    return ours, library, searches


def test_same_scales_as_llmcompressor(both):
    """The norms carry 1/s after folding: equal norms mean the same alpha was chosen for every mapping."""
    ours, library, searches = both
    assert len(searches) == 3 * len(ours.model.layers)  # v_proj -> o_proj is skipped: the model has grouped KV heads
    for mine, theirs in zip(ours.model.layers, library.model.layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            a, b = getattr(mine, norm).weight, getattr(theirs, norm).weight
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_same_quantized_weights_as_llmcompressor(both):
    """Every linear layer ends with the same zero-points, the same codes (but at exact rounding ties) and scales.

    llm-compressor keeps the scaled float weight and its quantization parameters until it saves;
    its codes are that weight rounded with those parameters.
    """
    ours, library, _ = both
    for name, module in library.named_modules():
        if not hasattr(module, "weight_scale"):
            continue
        mine = ours.get_submodule(name)
        assert isinstance(mine, rtn.QuantLinear)
        torch.testing.assert_close(mine.scale, module.weight_scale.float(), rtol=1e-5, atol=1e-8)
        theirs_zero = module.weight_zero_point.float() if hasattr(module, "weight_zero_point") else torch.zeros_like(mine.scale)
        assert torch.equal(mine.zero.float() if mine.zero is not None else torch.zeros_like(mine.scale), theirs_zero)
        scale, zero = module.weight_scale.float()[..., None], theirs_zero[..., None]
        position = rtn.grouped(module.weight.detach().float(), 128) / scale + zero  # before rounding
        codes = rtn.quantize(rtn.grouped(module.weight.detach().float(), 128), scale, zero, 4).reshape(module.weight.shape)
        differ = mine.weight_codes() != codes
        # The scaled weights agree to float rounding (~1e-8), so only a weight halfway between two levels may round apart.
        tie = ((position - position.floor() - 0.5).abs() < 1e-4).reshape(differ.shape)
        assert not (differ & ~tie).any(), f"{name}: {(differ & ~tie).sum()} codes differ away from a rounding tie"
        # Symmetric scales are absmax / 7.5: each group's largest-magnitude weight lands on +-7.5, a tie
        # by construction, and the last bit of the scaled weight decides -8 or -7 for a negative one.
        # Those may differ (seen: 20 codes in a layer of 512 groups); other ties are rare: about 2e-4 of
        # codes fall in the band at all.
        extreme = ((position.abs() - 7.5).abs() < 1e-4).reshape(differ.shape) & mine.symmetric
        assert (differ & ~extreme).sum() <= 1e-4 * differ.numel()


def test_grid_is_llmcompressors():
    from llmcompressor.modifiers.transform.awq import AWQModifier

    for duo in (True, False):
        assert awq.grid(20, duo) == AWQModifier(n_grid=20, duo_scaling=duo)._get_grid_search_params()
    with pytest.raises(LessonError, match="n_grid"):
        awq.grid(2)


def test_folding_keeps_the_function(embedded, calibration):
    """Scaling is exact before quantization: same block output, whatever the scales."""
    model, _ = embedded
    block = copy.deepcopy(model.model.layers[0])
    inputs = awq.first_layer_inputs(model, calibration[:2])
    before = [awq._output(block(*a, **k)) for a, k in inputs]
    s = torch.rand(block.mlp.gate_proj.in_features) * 4 + 0.25
    awq.fold(block.post_attention_layernorm, [block.mlp.gate_proj, block.mlp.up_proj], s)
    t = torch.rand(block.mlp.down_proj.in_features) + 0.5
    awq.fold(block.mlp.up_proj, [block.mlp.down_proj], t)
    after = [awq._output(block(*a, **k)) for a, k in inputs]
    for x, y in zip(before, after):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def test_search_lowers_the_block_error(embedded, calibration):
    model, _ = embedded
    block = copy.deepcopy(model.model.layers[0])
    searches = awq.scale_block(block, awq.first_layer_inputs(model, calibration), n_grid=10)
    assert all(s.errors[0][:2] == (0.0, False) for s in searches)  # the unscaled candidate is always tried
    assert all(s.improvement <= 1 for s in searches)
    assert min(s.improvement for s in searches) < 0.97


def activations_into(model, calibration, name: str) -> torch.Tensor:
    seen = []
    hook = model.get_submodule(name).register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    with torch.no_grad():
        model(calibration)
    hook.remove()
    return torch.cat(seen).reshape(-1, seen[0].shape[-1])  # [tokens, in]


def test_salient_channels_come_from_activations(embedded, calibration):
    """The AWQ paper's observation: keeping 1 % of columns chosen by activation beats choosing by weight or at random."""
    model, _ = embedded
    name = "model.layers.1.mlp.down_proj"
    x = activations_into(model, calibration[:8], name)
    w = model.get_submodule(name).weight.detach()

    def error(importance):
        return ((x @ (awq.keep_salient(w, importance, 0.01, bits=3, group_size=128) - w).T) ** 2).mean().item()

    by_activation = error(awq.mean_abs_input(x))
    by_weight = error(w.abs().mean(0))
    at_random = error(torch.rand(w.shape[1], generator=torch.Generator().manual_seed(0)))
    assert by_activation < 0.95 * min(by_weight, at_random)


def test_clip_search_lowers_the_output_error(embedded, calibration):
    model, _ = embedded
    name = "model.layers.0.mlp.gate_proj"
    x = activations_into(model, calibration[:4], name)[:512]
    w = model.get_submodule(name).weight.detach()
    plain = rtn.fake_quantize(w, 3, 128, symmetric=False)
    clipped = rtn.fake_quantize(awq.search_clip(w, x, bits=3, group_size=128), 3, 128, symmetric=False)
    assert ((x @ (clipped - w).T) ** 2).mean() < 0.95 * ((x @ (plain - w).T) ** 2).mean()


def test_unknown_architecture_gets_a_clear_error():
    block = torch.nn.Module()
    block.norm1, block.attn = torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)
    with pytest.raises(LessonError, match="mappings="):
        awq.mappings_for(block)
    custom = (awq.Mapping("norm1", ("attn",), "attn"),)
    assert awq.mappings_for(block, custom) == custom


def test_bad_settings_fail_before_changing_the_model(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LessonError, match="group_size=48"):
        awq.quantize_model(model, torch.zeros(2, 16, dtype=torch.long), group_size=48)
    with pytest.raises(LessonError, match="bits=9"):
        awq.quantize_model(model, torch.zeros(2, 16, dtype=torch.long), bits=9, group_size=32)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_clip_option_lowers_the_kl_divergence(embedded, calibration):
    """At llm-compressor's grid of 20: KL 0.0040 without clipping, 0.0033 with.

    With a grid of 5 the outcome hung on float rounding: computing ``w_mean`` in llm-compressor's
    dtypes (a change in its last bits) made clipping worse there, 0.0038 without and 0.0040 with.
    """
    from quantlesson import evaluate

    model, tokenizer = embedded
    ids = data.evaluation_tokens(tokenizer, max_tokens=2048)
    ref = evaluate.reference(model, ids, progress=False)
    plain, clipped = copy.deepcopy(model), copy.deepcopy(model)
    awq.quantize_model(plain, calibration[:8], bits=3, n_grid=20, progress=False)
    awq.quantize_model(clipped, calibration[:8], bits=3, n_grid=20, clip=True, progress=False)
    assert evaluate.kl_divergence(clipped, ref, progress=False) < evaluate.kl_divergence(plain, ref, progress=False)


def test_another_architecture_runs_with_its_own_mappings():
    """OPT has other module names: Llama's mappings are refused with a clear error, awq.OPT's work."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=64)  # fmt: skip
    model = OPTForCausalLM(config).eval()
    ids = torch.randint(0, 128, (4, 32))
    with pytest.raises(LessonError, match="mappings="):
        awq.quantize_model(copy.deepcopy(model), ids, group_size=32, progress=False)
    searches = awq.quantize_model(model, ids, bits=3, group_size=32, mappings=awq.OPT, n_grid=5, progress=False)
    assert [s.mapping for s in searches] == list(awq.OPT) * 2  # every mapping of every layer was searched
    assert all(s.improvement <= 1 for s in searches)  # the grid holds "no scaling", so the best is never worse
    fc1 = model.get_submodule("model.decoder.layers.0.fc1")
    assert isinstance(fc1, rtn.QuantLinear) and (fc1.bits, fc1.group_size) == (3, 32)
    assert len(torch.unique(fc1.weight_codes())) <= 8  # 3-bit codes: at most 2^3 levels
    groups = fc1.dequantized_weight().reshape(-1, 32)
    assert max(len(torch.unique(g)) for g in groups) <= 8 and len(torch.unique(groups)) > 8  # per group, not per layer
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def scheme_layer(weight: torch.Tensor, symmetric: bool, group_size: int = 32) -> torch.nn.Linear:
    """A linear layer carrying a compressed-tensors weight scheme, as llm-compressor's AWQ sees its balance layers."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    layer.weight.data = weight.clone()
    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=group_size)
    layer.quantization_scheme = QuantizationScheme(targets=["Linear"], weights=args)
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w_mean_is_llmcompressors(dtype):
    """Normalised in the weight's dtype and summed in float64, bit for bit (the old float64 normalisation was not)."""
    from llmcompressor.modifiers.transform.awq import AWQModifier

    torch.manual_seed(0)
    weights = [torch.randn(96, 128).to(dtype), torch.randn(64, 128).to(dtype)]
    theirs = AWQModifier._compute_layer_means([scheme_layer(w, symmetric=True) for w in weights])
    assert torch.equal(awq.mean_normalised_weight(weights, 32), theirs)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_candidates_quantize_as_llmcompressor(symmetric, dtype):
    """Each candidate: ``W * s`` in the weight's dtype, quantized there by compressed-tensors, divided by ``s``."""
    from compressed_tensors.quantization import fake_quantize
    from llmcompressor.observers import Observer

    torch.manual_seed(0)
    w = torch.randn(96, 128).to(dtype)
    s = awq.scales_for(0.5, torch.rand(128) + 0.1, awq.mean_normalised_weight([w], 32))  # float64, as duo scales are
    layer = scheme_layer((w * s).to(dtype), symmetric)
    args = layer.quantization_scheme.weights
    qparams = Observer.load_from_registry("memoryless_minmax", base_name="weight", args=args)(layer.weight).get_qparams()
    theirs = (fake_quantize(layer.weight, qparams["scale"], qparams["zero_point"], args) / s).to(dtype)
    assert torch.equal(awq.quantize_scaled(w, s, 4, 32, symmetric), theirs)


def parent_and_inputs():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32, bias=False)
    inputs = [((torch.randn(2, 16, 64) * (torch.rand(64) * 4),), {})]
    x_mean = awq.mean_abs_input(inputs[0][0][0])
    return linear, inputs, x_mean, awq.Mapping("norm", ("linear",), "linear")


def test_non_finite_candidates_are_skipped(monkeypatch):
    """A candidate whose error is NaN is not chosen (the old code kept a NaN first candidate: no scaling)."""
    linear, inputs, x_mean, mapping = parent_and_inputs()
    honest = awq.quantize_scaled

    def nan_without_scaling(w, s, *args):
        return torch.full_like(w, float("nan")) if torch.all(s == 1) else honest(w, s, *args)

    monkeypatch.setattr(awq, "quantize_scaled", nan_without_scaling)
    search = awq.search_scales(linear, [linear], x_mean, inputs, mapping, bits=3, group_size=32, n_grid=5)
    assert search.errors[0][:2] == (0.0, False) and search.errors[0][2] != search.errors[0][2]  # NaN, and tried
    assert search.duo and torch.isfinite(search.scales).all()
    chosen = next(e for a, d, e in search.errors if (a, d) == (search.alpha, search.duo))
    assert chosen == min(e for *_, e in search.errors if math.isfinite(e))


def test_all_non_finite_errors_raise(monkeypatch):
    linear, inputs, x_mean, mapping = parent_and_inputs()
    before = linear.weight.detach().clone()
    monkeypatch.setattr(awq, "quantize_scaled", lambda w, *args: torch.full_like(w, float("nan")))
    with pytest.raises(LessonError, match="Every candidate scale for norm -> linear gave a NaN"):
        awq.search_scales(linear, [linear], x_mean, inputs, mapping, bits=3, group_size=32, n_grid=5)
    assert torch.equal(linear.weight, before)  # the weights are put back
    inputs[0][0][0][0, 0, 0] = float("inf")  # the unquantized block already overflows
    monkeypatch.undo()
    with pytest.raises(LessonError, match="before any quantization"):
        awq.search_scales(linear, [linear], x_mean, inputs, mapping, bits=3, group_size=32, n_grid=5)


def test_no_calibration_sequences_are_refused(tiny_llama):
    """Zero sequences (or zero tokens) used to fail deep inside with a ZeroDivisionError."""
    for empty in (torch.zeros(0, 16, dtype=torch.long), torch.zeros(4, 0, dtype=torch.long)):
        with pytest.raises(LessonError, match="at least 1"):
            awq.quantize_model(copy.deepcopy(tiny_llama), empty, group_size=32, progress=False)
    with pytest.raises(LessonError, match="no calibration inputs"):
        awq.scale_block(copy.deepcopy(tiny_llama.model.layers[0]), [], group_size=32)


def test_work_stays_on_the_layers_device(tiny_llama):
    """With "meta" as the default device, a tensor made without the layer's device would break the run on the CPU.

    The old clip search made its running best error that way (on the CPU, whatever the layer's device).
    """
    calibration = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    expected = copy.deepcopy(tiny_llama)
    awq.quantize_model(expected, calibration, bits=3, group_size=32, n_grid=5, clip=True, progress=False)
    result = copy.deepcopy(tiny_llama)
    with torch.device("meta"):
        awq.quantize_model(result, calibration, bits=3, group_size=32, n_grid=5, clip=True, progress=False)
    for (name, mine), theirs in zip(result.state_dict().items(), expected.state_dict().values()):
        assert mine.device.type == "cpu" and torch.equal(mine, theirs), name


def test_fold_moves_the_scales_to_each_layer():
    """Scales made on one device fold into layers on another (here: CPU scales, layers on "meta")."""
    with torch.device("meta"):
        norm, linear = torch.nn.LayerNorm(8), torch.nn.Linear(8, 4)
    awq.fold(norm, [linear], torch.rand(8) + 0.5)
    assert linear.weight.device.type == norm.weight.device.type == norm.bias.device.type == "meta"
