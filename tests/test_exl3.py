"""quantlesson.exl3 on a CPU: what it says where ExLlamaV3 cannot run, and the files it hands the converter."""

import json
import sys
import types

import pytest
import torch

from quantlesson import exl3
from quantlesson.errors import LessonError


def test_without_a_gpu_it_says_so(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert exl3.available() is False
    assert "ExLlamaV3" in capsys.readouterr().out


def test_on_a_t4_it_says_the_lesson_has_not_run_it_there_and_how_to_try(fake_t4, capsys):
    assert exl3.available() is False
    message = capsys.readouterr().out
    assert "Tesla T4" in message and "7.5" in message and "untested=True" in message
    supported, note = exl3.gpu_support()
    assert supported and "fallback" in note


def test_on_a_t4_untested_goes_on_to_the_import(fake_t4, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "exllamav3", None)  # not installed: the import is the next step
    assert exl3.available(untested=True) is False
    message = capsys.readouterr().out
    assert "fallback" in message and "not installed" in message


def test_on_a_v100_it_names_the_capability_it_needs(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-32GB")
    assert exl3.available(untested=True) is False
    message = capsys.readouterr().out
    assert "7.5" in message and "7.0" in message and "GGUF" in message


def _fake_amd(monkeypatch, name: str, arch: str, warp: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", "6.4")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    properties = types.SimpleNamespace(name=name, gcnArchName=arch, warp_size=warp)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: properties)


def test_on_lumis_mi250x_it_says_exllamav3_runs_only_rdna(monkeypatch, capsys):
    _fake_amd(monkeypatch, "AMD Instinct MI250X", "gfx90a:sramecc+:xnack-", 64)
    assert exl3.available(untested=True) is False
    message = capsys.readouterr().out
    assert "RDNA" in message and "gfx90a" in message and "64-wide" in message and "xnack" not in message


def test_on_an_rdna_gpu_it_asks_for_untested(monkeypatch, capsys):
    _fake_amd(monkeypatch, "AMD Radeon RX 7900 XTX", "gfx1100", 32)
    assert exl3.available() is False
    assert "untested=True" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "exllamav3", None)
    assert exl3.available(untested=True) is False
    assert "not installed" in capsys.readouterr().out


def test_on_ampere_and_newer_there_is_no_note(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-40GB")
    monkeypatch.setattr(torch.version, "hip", None)
    assert exl3.gpu_support() == (True, "")


@pytest.mark.parametrize("bits, head_bits", [(0.5, 6), (8.5, 6), (4.0, 0), (4.0, 9), (4.0, 12)])
def test_bit_widths_outside_the_converters_range_are_refused(bits, head_bits):
    with pytest.raises(LessonError, match="bits"):
        exl3.check_bits(bits, head_bits)


@pytest.mark.parametrize("bits, head_bits", [(1.0, 1), (2.5, 6), (8.0, 8), (4.0, 16)])
def test_bit_widths_inside_the_range_pass(bits, head_bits):
    exl3.check_bits(bits, head_bits)


def test_convert_refuses_a_folder_without_a_config_before_running_anything(tmp_path):
    with pytest.raises(LessonError, match="config.json"):
        exl3.convert(tmp_path / "missing", tmp_path / "work", 4.0)
    assert not (tmp_path / "work").exists()  # nothing half-written


def test_calibration_file_holds_the_token_windows(tmp_path):
    from safetensors.torch import load_file

    windows = torch.randint(0, 4096, (4, 32), dtype=torch.int32)
    path = exl3.write_calibration(windows, tmp_path / "calibration.safetensors")
    stored = load_file(str(path))["input_ids"]
    assert stored.dtype == torch.int64 and torch.equal(stored, windows.long())
    with pytest.raises(LessonError, match="rows, columns"):
        exl3.write_calibration(windows[0], tmp_path / "flat.safetensors")


def test_stored_bits_reads_the_exl3_config_and_refuses_others(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "exl3", "bits": 3.5}}))
    assert exl3.stored_bits(tmp_path) == 3.5
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq", "bits": 4}}))
    with pytest.raises(LessonError, match="not an EXL3"):
        exl3.stored_bits(tmp_path)


def test_twin_row_names_the_twin_and_rounds_the_measured_figures():
    twin = {"size_bytes": 1_234_567_890, "decode_tok_s": 512.345, "quant_seconds": 98.76, "gpu_bytes": 1.0, "bound_tok_s": 2.0}
    row = exl3.twin_row("Llama-3.2-1B", twin, bits=3.0)
    assert row["model"] == "Llama-3.2-1B (shape twin)" and row["method"].startswith("EXL3 3.0 bpw")
    assert (row["bits"], row["size_mb"], row["decode_tok_s"], row["quant_seconds"]) == (3, 1234.6, 512.3, 98.8)


def smollm2_shaped(layers: int = 2):
    """A random model with SmolLM2-135M's widths (hidden 576, not a multiple of 128), ``layers`` deep, float32."""
    from transformers import AutoModelForCausalLM

    from quantlesson import models

    config = models.twin_config("SmolLM2-135M")
    config.num_hidden_layers, config.vocab_size = layers, 512
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def test_save_widens_a_576_wide_model_and_leaves_the_original_alone(tmp_path, embedded, capsys):
    import copy

    from safetensors.torch import load_file

    model = smollm2_shaped()
    tokens = torch.randint(0, 512, (1, 48))
    with torch.no_grad():
        before = model(tokens).logits
    folder = exl3.save(model, embedded[1], tmp_path / "hf")
    assert "576" in capsys.readouterr().out and model.config.hidden_size == 576  # the caller's model is untouched
    saved = json.loads((folder / "config.json").read_text())
    assert (saved["hidden_size"], saved["head_dim"]) == (640, 64)
    assert saved["rms_norm_eps"] == pytest.approx(model.config.rms_norm_eps * 576 / 640)
    exl3.check_folder(folder)  # accepted now
    # transformers will not load a hidden size that is no multiple of the 9 heads: read the saved tensors into a widened copy
    widened = copy.deepcopy(model)
    exl3.pad_hidden_size(widened)
    widened.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
    with torch.no_grad():
        after = widened(tokens).logits
    assert torch.allclose(after, before, atol=1e-5, rtol=1e-4)  # the same function, read back from disk


def test_convert_refuses_a_hidden_size_exllamav3_cannot_run_and_says_how_to_save_it(tmp_path):
    model = smollm2_shaped(layers=1)
    model.save_pretrained(tmp_path / "hf")
    with pytest.raises(LessonError, match=r"576.*exl3\.save"):
        exl3.convert(tmp_path / "hf", tmp_path / "work", 4.0)
    assert not (tmp_path / "work").exists()  # refused before anything was written


def test_repeat_layers_lengthens_a_converted_model_layer_by_layer(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {"model.embed_tokens.weight": torch.zeros(4, 2), "lm_head.trellis": torch.ones(3)}
    for layer in range(2):
        tensors[f"model.layers.{layer}.mlp.down_proj.trellis"] = torch.full((2, 2), float(layer))
        tensors[f"model.layers.{layer}.input_layernorm.weight"] = torch.full((2,), 10.0 + layer)
    save_file({k: v for k, v in tensors.items() if "layers.1" not in k}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: v for k, v in tensors.items() if "layers.1" in k}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "hidden_size": 128}))
    exl3.repeat_layers(tmp_path, 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert [stored[f"model.layers.{i}.mlp.down_proj.trellis"][0, 0].item() for i in range(5)] == [0, 1, 0, 1, 0]
    assert [stored[f"model.layers.{i}.input_layernorm.weight"][0].item() for i in range(5)] == [10, 11, 10, 11, 10]
    assert torch.equal(stored["lm_head.trellis"], torch.ones(3)) and len(stored) == 2 + 2 * 5
    assert json.loads((tmp_path / "config.json").read_text())["num_hidden_layers"] == 5
    with pytest.raises(LessonError, match="5 layers"):
        exl3.repeat_layers(tmp_path, 3)


def test_twin_row_of_a_repeated_twin_says_so_and_gives_no_conversion_time():
    twin = {"size_bytes": 5e9, "decode_tok_s": 300.0, "quant_seconds": 40.0, "converted_layers": 2, "layers": 32}
    row = exl3.twin_row("Llama-3.1-8B", twin)
    assert "2 converted layers repeated to 32" in row["method"] and row["quant_seconds"] is None


def test_twin_speed_refuses_more_layers_than_the_twin_has(tmp_path):
    with pytest.raises(LessonError, match="between 1 and 16"):
        exl3.twin_speed("Llama-3.2-1B", None, tmp_path, layers=17)


class _Generator:  # stands in for exllamav3.Generator: enqueue a job, then iterate until done
    error = None

    def __init__(self, **_):
        self.jobs = 0

    def enqueue(self, job):
        self.jobs += 1

    def num_remaining_jobs(self):
        return self.jobs

    def iterate(self):
        if self.error:
            raise RuntimeError(self.error)
        self.jobs -= 1


def _runner_with(monkeypatch, error):
    import sys
    import types

    fake = types.SimpleNamespace(Generator=type("G", (_Generator,), {"error": error}), Job=lambda **_: None, ArgmaxSampler=lambda: None)
    monkeypatch.setitem(sys.modules, "exllamav3", fake)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    runner = exl3.ExLlamaV3Model.__new__(exl3.ExLlamaV3Model)
    runner.model = runner.cache = runner.tokenizer = None
    return runner


def test_decode_speed_is_none_with_exllamav3_s_reason_where_it_has_no_kernel_for_the_shapes(monkeypatch, capsys):
    runner = _runner_with(monkeypatch, "exl3_mgemm autotune: no compatible kernel shapes")
    assert runner.decode_speed(torch.arange(8), new_tokens=4) is None
    assert "no compatible kernel shapes" in capsys.readouterr().out


def test_decode_speed_lets_other_errors_through(monkeypatch):
    with pytest.raises(RuntimeError, match="out of memory"):
        _runner_with(monkeypatch, "CUDA out of memory").decode_speed(torch.arange(8), new_tokens=4)


def test_pad_hidden_size_keeps_the_model_s_function():
    from transformers import AutoModelForCausalLM

    from quantlesson import models

    config = models.twin_config("SmolLM2-135M")  # hidden 576: ExLlamaV3 1.6.5 cannot run it as it is
    config.num_hidden_layers, config.vocab_size = 3, 256
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float64).eval()
    tokens = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        before = model(tokens).logits
        assert exl3.pad_hidden_size(model) == 640
        after = model(tokens).logits
        hidden = model(tokens, output_hidden_states=True).hidden_states[-2]
    assert torch.allclose(after, before, rtol=1e-5, atol=1e-5)  # RMSNorm computes in float32 inside transformers
    assert hidden.shape[-1] == 640 and hidden[..., 576:].abs().max() == 0  # the new dimensions stay zero
    assert exl3.pad_hidden_size(model) == 640  # a multiple already: nothing changes


def test_pad_hidden_size_handles_llama_only():
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=72, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2,
                                     word_embed_proj_dim=72))  # fmt: skip
    with pytest.raises(LessonError, match="Llama"):
        exl3.pad_hidden_size(model)


def test_exllamav3_still_fails_on_a_576_wide_model_and_runs_it_widened():
    """The H200 probe (tools/gpu_exl3_probe.py) and 07c's SmolLM2 rows, committed: re-run both when the ExLlamaV3 pin moves."""
    import json
    from pathlib import Path

    from quantlesson import report

    results = Path(__file__).resolve().parent.parent / "results"
    probe = json.loads((results / "gpu-exl3-probe.json").read_text())
    assert probe["exllamav3"] == exl3.VERSION, "ExLlamaV3's pin moved: run tools/gpu_exl3_probe.py on a GPU again"
    plain, widened = probe["save_pretrained"], probe["exl3.save"]
    assert plain["hidden_size"] == 576 and widened["hidden_size"] == 640
    assert "incompatible shapes" in plain["unconverted"]["error"]  # ExLlamaV3 cannot run it as saved...
    assert not plain["convert_4.0"]["converted"] and "(576) must match the size of tensor b (640)" in plain["convert_4.0"]["tail"]
    assert widened["unconverted"]["forward"] == "ran" and widened["convert_4.0"]["converted"]  # ...and runs it widened
    # the widened real model computes what the original does: ExLlamaV3's float16 against transformers' float32
    rows = report.read(results / "gpu-exl3.csv")
    unquantized = rows[(rows["model"] == "smollm2-offline") & rows["method"].str.startswith("float16")]
    assert len(unquantized) == 1 and unquantized["kld"].iloc[0] < 1e-4 and unquantized["top1"].iloc[0] > 0.99


def test_unfuse_narrow_kv_unfuses_only_pairs_whose_width_is_no_multiple_of_128():
    import types

    class Fused:
        unloaded = False

        def unload(self):
            self.unloaded = True

    def attention(kv_heads: int, fused: bool):
        return types.SimpleNamespace(num_kv_heads=kv_heads, head_dim=64, multi_kv=Fused() if fused else None, modules=[])

    narrow, wide, plain = attention(3, True), attention(8, True), attention(3, False)  # 192, 512 and 192 unfused already
    model = types.SimpleNamespace(modules=[types.SimpleNamespace(modules=[narrow, plain]), types.SimpleNamespace(modules=[wide])])
    pair = narrow.multi_kv
    assert exl3.unfuse_narrow_kv(model) == 1
    assert narrow.multi_kv is None and pair.unloaded  # its buffers freed, the projections then run one by one
    assert wide.multi_kv is not None and not wide.multi_kv.unloaded
    assert exl3.unfuse_narrow_kv(model) == 0  # nothing left to do the second time


def test_exllamav3_cannot_decode_a_fused_192_wide_key_value_pair_and_decodes_it_unfused():
    """The evidence for exl3.unfuse_narrow_kv: the H200 probe decodes its widened SmolLM2 twin both ways."""
    from pathlib import Path

    probe = json.loads((Path(__file__).resolve().parent.parent / "results" / "gpu-exl3-probe.json").read_text())
    assert probe["exllamav3"] == exl3.VERSION, "ExLlamaV3's pin moved: run tools/gpu_exl3_probe.py on a GPU again"
    widened = probe["exl3.save"]
    if "decode_4.0_fused_kv" not in widened:
        pytest.skip("the committed probe predates exl3.unfuse_narrow_kv: run tools/gpu_exl3_probe.py on a GPU "
                    "(tools/gpu_run.sh, stage 'tool') and commit its JSON")
    fused, unfused = widened["decode_4.0_fused_kv"], widened["decode_4.0_unfused_kv"]
    assert fused["tokens_per_s"] is None and "no compatible kernel shapes" in fused["printed"]  # still needed...
    assert unfused["tokens_per_s"] > 0  # ...and it mends the decode
