"""The from-scratch AWQ, checked against llm-compressor's AWQModifier on the same model and calibration data."""

import copy

import pytest
import torch

from quantlesson import LessonError, compat, data
from quantlesson.scratch import awq, rtn


@pytest.fixture(scope="module")
def calibration(embedded):
    _, tokenizer = embedded
    return data.calibration_tokens(tokenizer, n=16, seq_len=256)


@pytest.fixture(scope="module")
def both(embedded, calibration):
    """The embedded model through the from-scratch AWQ and through llm-compressor's, with the same settings."""
    model, tokenizer = embedded
    ours = copy.deepcopy(model)
    searches = awq.quantize_model(ours, calibration, bits=4, group_size=128, symmetric=False, n_grid=20, progress=False)

    compat.llmcompressor_awq_on_cpu()
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    library = copy.deepcopy(model)
    oneshot(
        model=library, dataset=data.calibration_dataset(tokenizer, n=16, seq_len=256), num_calibration_samples=16,
        max_seq_length=256, shuffle_calibration_samples=False,
        recipe=[AWQModifier(n_grid=20), QuantizationModifier(targets="Linear", scheme="W4A16_ASYM", ignore=["lm_head"])],
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
        assert torch.equal(mine.zero.float(), module.weight_zero_point.float())
        scale, zero = module.weight_scale.float()[..., None], module.weight_zero_point.float()[..., None]
        position = rtn.grouped(module.weight.detach().float(), 128) / scale + zero  # before rounding
        codes = rtn.quantize(rtn.grouped(module.weight.detach().float(), 128), scale, zero, 4).reshape(module.weight.shape)
        differ = mine.weight_codes() != codes
        # The scaled weights agree to float rounding (~1e-8), so only a weight halfway between two levels may round apart.
        tie = ((position - position.floor() - 0.5).abs() < 1e-4).reshape(differ.shape)
        assert not (differ & ~tie).any(), f"{name}: {(differ & ~tie).sum()} codes differ away from a rounding tie"
        assert differ.sum() <= 1e-5 * differ.numel()


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
    from quantlesson import evaluate

    model, tokenizer = embedded
    ids = data.evaluation_tokens(tokenizer, max_tokens=2048)
    ref = evaluate.reference(model, ids, progress=False)
    plain, clipped = copy.deepcopy(model), copy.deepcopy(model)
    awq.quantize_model(plain, calibration[:8], bits=3, n_grid=5, progress=False)
    awq.quantize_model(clipped, calibration[:8], bits=3, n_grid=5, clip=True, progress=False)
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
