"""The EXL2-style measurement and allocation from scratch."""

import copy

import pandas as pd
import pytest
import torch

from quantlesson import LessonError, data, evaluate
from quantlesson.scratch import exl2_alloc, gptq


def toy_measurement():
    """Two layers: 'a' suffers badly at low bits, 'b' hardly at all."""
    rows = []
    for layer, sensitivity in (("a", 1.0), ("b", 0.01)):
        for bits in (2, 3, 4, 8):
            rows.append({"layer": layer, "bits": bits, "group_size": 128, "bpw": exl2_alloc.cost(bits, 128),
                         "weights": 1000, "error": sensitivity * 4.0 ** -bits})
    return pd.DataFrame(rows)


def test_allocation_spends_bits_on_the_sensitive_layer_and_meets_the_budget():
    m = toy_measurement()
    a = exl2_alloc.allocate(m, 3.25)
    assert a.bpw <= 3.25 + 1e-9
    assert a.settings["a"][0] > a.settings["b"][0]
    assert a.error < exl2_alloc.uniform(m, 3, 128).error
    assert exl2_alloc.allocate(m, 100).settings == {"a": (8, 128), "b": (8, 128)}
    with pytest.raises(LessonError, match="below the cheapest"):
        exl2_alloc.allocate(m, 1.0)
    with pytest.raises(LessonError, match="was not measured"):
        exl2_alloc.uniform(m, 5, 64)


def test_frontier_drops_settings_that_cost_more_and_do_no_better():
    rows = pd.DataFrame({"bpw": [2.25, 3.0, 3.25, 4.25], "error": [1.0, 1.2, 0.5, 0.6]})
    assert exl2_alloc.frontier(rows)["bpw"].tolist() == [2.25, 3.25]


def test_mixed_allocation_beats_uniform_bits_on_the_embedded_model(embedded):
    model, tokenizer = embedded
    calibration = data.calibration_tokens(tokenizer, n=16, seq_len=256)
    m = exl2_alloc.measure(model, calibration, progress=False)
    assert len(m) == len(exl2_alloc.SETTINGS) * 7 * len(model.model.layers)
    # more bits, less error, for every layer and group size
    for _, rows in m.groupby(["layer", "group_size"]):
        assert rows.sort_values("bits")["error"].is_monotonic_decreasing
    ref = evaluate.reference(model, data.evaluation_tokens(tokenizer, max_tokens=2048), progress=False)
    mixed = exl2_alloc.allocate(m, 3.25)
    mixed_model = gptq.quantize_model(copy.deepcopy(model), calibration, symmetric=False, per_layer=mixed.settings, progress=False)
    uniform_model = gptq.quantize_model(copy.deepcopy(model), calibration, bits=3, group_size=128, symmetric=False, progress=False)
    assert mixed.bpw <= 3.25 + 1e-9
    assert evaluate.kl_divergence(mixed_model, ref, progress=False) < evaluate.kl_divergence(uniform_model, ref, progress=False)


def test_per_layer_settings_reach_the_layers(tiny_llama):
    calibration = torch.randint(0, 128, (4, 64))
    name = "model.layers.0.mlp.down_proj"
    quantized = gptq.quantize_model(copy.deepcopy(tiny_llama), calibration, bits=4, group_size=32, per_layer={name: (2, 64)}, progress=False)
    assert (quantized.get_submodule(name).bits, quantized.get_submodule(name).group_size) == (2, 64)
    assert quantized.get_submodule("model.layers.0.mlp.up_proj").bits == 4
    with pytest.raises(LessonError, match="per_layer names"):
        gptq.quantize_model(copy.deepcopy(tiny_llama), calibration, per_layer={"nope": (4, 32)}, group_size=32)


def test_decode_rate_leaves_the_prefill_out():
    """ExLlamaV2's generator times prefill and decode together; the lesson subtracts a one-token run."""
    from quantlesson import LessonError, exl2

    def run(new_tokens: int) -> float:  # 0.5 s of prefill, then 10 ms per token
        return 0.5 + 0.01 * new_tokens

    assert exl2.decode_rate(run, 129) == pytest.approx(100.0)
    with pytest.raises(LessonError, match="at least 2"):
        exl2.decode_rate(run, 1)


def test_gpu_bytes_leave_the_embedding_table_on_the_cpu():
    from quantlesson import LessonError, exl2, models

    config = models.twin_config("Llama-3.2-1B")
    table = config.vocab_size * config.hidden_size * 2  # float16
    assert exl2.gpu_bytes_per_token(1.22e9, config) == pytest.approx(1.22e9 - table)
    with pytest.raises(LessonError, match="whole EXL2 folder"):
        exl2.gpu_bytes_per_token(1220.0, config)  # megabytes passed by mistake


def test_a_layer_with_an_all_zero_group_still_gets_its_bits(tiny_llama):
    """An all-zero group once made round-to-nearest return NaN, and the NaN errors cut the layer's
    frontier down to its cheapest setting: with bits to spare it stayed at 2 bits."""
    model = copy.deepcopy(tiny_llama)
    name = "model.layers.0.mlp.down_proj"
    with torch.no_grad():
        model.get_submodule(name).weight[3, :32] = 0
    settings = [(bits, group) for bits in (2, 4, 8) for group in (32, 64)]
    m = exl2_alloc.measure(model, torch.randint(0, 128, (4, 64)), settings=settings, progress=False)
    assert m["error"].notna().all()
    assert exl2_alloc.allocate(m, 100).settings[name] == (8, 32)  # the best setting, as for every other layer


def test_output_error_of_an_all_zero_layer_is_zero_not_nan():
    W, H = torch.zeros(4, 8), torch.eye(8)
    assert exl2_alloc.output_error(W, W.clone(), H) == 0.0


def _measurement_with_nan():
    m = toy_measurement()
    m.loc[1, "error"] = float("nan")
    return m


BAD_INPUTS = [
    (lambda: exl2_alloc.allocate(_measurement_with_nan(), 4.0), "NaN"),
    (lambda: exl2_alloc.allocate(toy_measurement().iloc[0:0], 4.0), "empty"),
    (lambda: exl2_alloc.allocate(toy_measurement().drop(columns="weights"), 4.0), "weights"),
    (lambda: exl2_alloc.allocate(toy_measurement(), float("nan")), "target_bpw"),
    (lambda: exl2_alloc.cost(4, 0), "group_size"),
    (lambda: exl2_alloc.output_error(torch.randn(4, 8), torch.randn(4, 8), torch.eye(6)), "[in, in]"),
    (lambda: exl2_alloc.measure(torch.nn.Linear(8, 8), torch.randn(2, 16), progress=False), "token ids"),
    (lambda: exl2_alloc.measure(torch.nn.Linear(8, 8), torch.randint(0, 8, (16,)), progress=False), "[n, tokens]"),
]


@pytest.mark.parametrize("call,phrase", BAD_INPUTS, ids=range(len(BAD_INPUTS)))
def test_bad_input_is_a_lesson_error_that_says_what_to_do(call, phrase):
    with pytest.raises(LessonError) as caught:
        call()
    assert phrase in str(caught.value)


def test_settings_are_checked_before_the_measurement(tiny_llama, monkeypatch):
    def hessians(*args, **kwargs):
        raise AssertionError("the calibration pass ran before the settings were checked")

    monkeypatch.setattr(exl2_alloc, "hessians", hessians)
    with pytest.raises(LessonError, match="does not divide"):
        exl2_alloc.measure(tiny_llama, torch.ones(1, 8, dtype=torch.long), settings=[(4, 96)], progress=False)
