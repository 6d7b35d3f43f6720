"""kernelbench: which class does a model's multiplying, the references the 4-bit paths are checked against,
and clear messages where a path cannot run (its GPU figures come from tools/gpu_kernels.py)."""

import copy

import pytest
import torch

from quantlesson import LessonError, kernelbench
from quantlesson.scratch import rtn


def test_the_reference_holds_the_dequantized_codes_and_unties_a_tied_head(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    embedding = model.model.embed_tokens.weight.detach().clone()
    kernelbench.dequantize_in_place(model, group_size=32, skip=())
    q_proj = tiny_llama.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, rtn.fake_quantize(q_proj.float(), 4, 32, symmetric=True))
    assert torch.equal(model.model.embed_tokens.weight, embedding), "the embedding table keeps its own weights"
    head_group = model.lm_head.weight[0, :32]
    assert not torch.equal(model.lm_head.weight, embedding) and len(torch.unique(head_group)) <= 16  # 4-bit codes


def test_the_reference_leaves_the_head_alone_by_default(tiny_llama):
    model = kernelbench.dequantize_in_place(copy.deepcopy(tiny_llama), group_size=32)
    assert torch.equal(model.lm_head.weight, tiny_llama.lm_head.weight)
    assert not torch.equal(model.model.layers[1].mlp.down_proj.weight, tiny_llama.model.layers[1].mlp.down_proj.weight)


def test_linear_classes_name_the_layers_that_multiply(tiny_llama):
    assert kernelbench.linear_classes(tiny_llama) == {"Linear": 15}  # 7 per layer, and the head
    quantized = rtn.quantize_model(copy.deepcopy(tiny_llama), 4, 32)
    assert kernelbench.linear_classes(quantized) == {"QuantLinear": 14, "Linear": 1}
    with pytest.raises(LessonError, match="no linear layers"):
        kernelbench.linear_classes(torch.nn.Sequential(torch.nn.ReLU()))


def test_without_a_gpu_gemlite_says_what_to_do(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert kernelbench.gemlite_available() is False
    assert "needs an NVIDIA GPU" in capsys.readouterr().out
    with pytest.raises(LessonError, match="needs an NVIDIA GPU"):
        kernelbench.quantize_to_gemlite(torch.nn.Sequential(torch.nn.Linear(256, 256)))


def test_on_a_t4_gemlite_names_the_capability_it_needs(fake_t4):
    with pytest.raises(LessonError, match=r"compute capability 8\.0 or newer.*Tesla T4"):
        kernelbench.quantize_to_gemlite(torch.nn.Sequential(torch.nn.Linear(256, 256)))


def test_the_benchmark_needs_a_gpu_and_names_its_paths(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert kernelbench.benchmark("Llama-3.2-1B", bandwidth=1e12) is None
    assert "NVIDIA GPU" in capsys.readouterr().out
    with pytest.raises(LessonError, match="No kernel path called 'int3'.*NF4 bitsandbytes"):
        kernelbench.build("Llama-3.2-1B", "int3")


def test_logit_check_measures_relative_error_and_top1():
    reference = [torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[0.0, 0.0, 3.0]])]
    assert kernelbench.logit_check(reference, reference) == (0.0, 1.0)
    off = [torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([[0.0, 0.0, 3.3]])]
    error, top1 = kernelbench.logit_check(off, reference)
    assert error == pytest.approx((2.0 / 5.0) ** 0.5)
    assert top1 == 0.5


def test_the_floor_path_keeps_shapes_and_does_no_multiplying():
    layer = kernelbench.NoMatmul(64, 48)
    x = torch.randn(2, 3, 64)
    out = layer(x)
    assert out.shape == (2, 3, 48) and torch.equal(out, x[..., :1].expand(2, 3, 48)) and out.is_contiguous()
    wrapped = kernelbench.ContiguousInput(torch.nn.Linear(64, 8))
    assert wrapped(x[:, -1:, :]).shape == (2, 1, 8) and (wrapped.in_features, wrapped.out_features) == (64, 8)
    checked = kernelbench.checks("Llama-3.2-1B", "no matmuls (floor)", torch.nn.Identity())
    assert set(checked) == set(kernelbench.CHECKS) and all(v != v for v in checked.values())  # NaN: nothing to check


def _runs():
    import pandas as pd

    rows = []
    for weights, speeds, ms_floor in (("bfloat16", {1: (100, 150), 16: (80, 90)}, None),
                                      ("int4 gemlite", {1: (160, 240), 16: (70, 130)}, None),
                                      ("no matmuls (floor)", {1: (500, 800)}, True)):
        for batch, (graph, compiled) in speeds.items():
            for path, value in (("static cache + CUDA graph", graph), ("static cache + CUDA graph + torch.compile", compiled)):
                rows.append({"model": "twin", "weights": weights, "path": path, "batch": batch, "tokens_per_s": value,
                             "ms_per_step": 1000 / value, "roofline_fraction": value / 1000, "kernel": "K",
                             "layer_error": 0.01, "top1_agreement": 0.9, "prefill_tokens_per_s": 1000})
    rows.append({"model": "twin", "weights": "int4 gemlite", "path": "graph", "batch": 64, "note": "graph failed"})
    return pd.DataFrame(rows)


def test_the_summary_takes_each_paths_best_way_of_decoding():
    table = kernelbench.summary(_runs())
    assert list(table.index.get_level_values("weights")) == ["bfloat16", "int4 gemlite", "no matmuls (floor)"]
    assert table.loc[("twin", "int4 gemlite"), "decode b1"] == 240 and table.loc[("twin", "bfloat16"), "decode b16"] == 90
    assert table.loc[("twin", "int4 gemlite"), "x bfloat16 b1"] == pytest.approx(240 / 150)
    assert table.loc[("twin", "int4 gemlite"), "bound share b1"] == pytest.approx(0.24)
    assert table.loc[("twin", "no matmuls (floor)"), "bound share b1"] != table.loc[("twin", "no matmuls (floor)"), "bound share b1"]  # NaN: it reads no weights
    assert kernelbench.floor_ms(_runs(), "twin") == pytest.approx(1000 / 800)
    with pytest.raises(LessonError, match="No floor measurement for other"):
        kernelbench.floor_ms(_runs(), "other")
