"""quantlesson.exl3 on a CPU: what it says where ExLlamaV3 cannot run, and the files it hands the converter."""

import json

import pytest
import torch

from quantlesson import exl3
from quantlesson.errors import LessonError


def test_without_a_gpu_it_says_so(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert exl3.available() is False
    assert "ExLlamaV3" in capsys.readouterr().out


def test_on_a_t4_it_names_the_capability_it_needs(fake_t4, capsys):
    assert exl3.available() is False
    message = capsys.readouterr().out
    assert "8.0" in message and "Tesla T4" in message and "7.5" in message


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
