"""modelcard: the card's front matter, settings, calibration, results and versions; atomic writes; clear errors."""

import math
import os

import pandas as pd
import pytest
import yaml

from quantlesson import LessonError, modelcard

RESULTS = [
    {"method": "unquantized", "bits": 16, "bits_per_weight": 16.0, "size_mb": 270.9, "perplexity": 5.634, "kld": 0.0, "top1": 1.0},
    {"method": "GPTQ", "bits": 4, "group_size": 64, "bits_per_weight": 4.5, "size_mb": 84.31, "perplexity": 7.541,
     "kld": 0.27812, "top1": 0.7904},
]  # fmt: skip
VERSIONS = {"transformers": "5.17.0", "gptqmodel": "7.6.0", "torch": "2.13.0"}


def _card(folder, **overrides):
    arguments = dict(base_model="HuggingFaceTB/SmolLM2-135M", method="GPTQ", bits=4, group_size=64,
                     calibration="64 rows of 512 tokens of the lesson's calibration text", results=RESULTS,
                     library_versions=VERSIONS)  # fmt: skip
    arguments.update(overrides)
    return modelcard.write_model_card(folder, **arguments)


def _split(text: str) -> tuple[dict, str]:
    """The card's front matter (parsed) and its body."""
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def _table(body: str, section: str) -> list[list[str]]:
    """The cells of the first Markdown table under the heading ``## section``."""
    lines = body.split(f"\n## {section}\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def test_front_matter_is_what_the_hub_reads(tmp_path):
    from huggingface_hub import ModelCard

    path = _card(tmp_path)
    assert path == tmp_path / "README.md"
    meta, _ = _split(path.read_text())
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert "quantized" in meta["tags"] and "gptq" in meta["tags"]
    assert meta["library_name"] == "transformers"
    assert ModelCard(path.read_text()).data.base_model == "HuggingFaceTB/SmolLM2-135M"  # the Hub library parses it


@pytest.mark.parametrize("method, tag, library", [
    ("GGUF", "gguf", "llama-cpp-python"), ("bitsandbytes NF4", "bitsandbytes-nf4", "transformers"),
    ("EXL2", "exl2", None),
])  # fmt: skip
def test_tags_and_library_follow_the_method(tmp_path, method, tag, library):
    meta, _ = _split(_card(tmp_path, method=method).read_text())
    assert tag in meta["tags"] and meta.get("library_name") == library


def test_body_states_method_settings_calibration_and_measurement(tmp_path):
    _, body = _split(_card(tmp_path).read_text())
    assert "arxiv.org/abs/2210.17323" in body  # GPTQ's description names its paper
    settings = dict(_table(body, "Settings")[2:])
    assert settings["bits"] == "4" and "64" in settings["group size"]
    assert "64 rows of 512 tokens" in body.split("## Calibration data", 1)[1].split("##", 1)[0]
    assert "quantlesson.evaluate" in body
    for words in ("perplexity", "KL divergence", "top-1 agreement", "unquantized model"):
        assert words in body


def test_results_table_has_every_row_and_value(tmp_path):
    frame = pd.DataFrame(RESULTS)  # a DataFrame gives group_size NaN for the unquantized row
    for results in (RESULTS, frame):
        _, body = _split(_card(tmp_path, results=results).read_text())
        header, rule, *rows = _table(body, "Results")
        assert header[:8] == list(modelcard.COLUMN_ORDER)
        assert set(rule) == {"---"} and len(rows) == len(RESULTS)
        for row, expected in zip(rows, RESULTS):
            cells = dict(zip(header, row))
            for column in header:
                value = expected.get(column)
                if value is None or (isinstance(value, float) and math.isnan(value)):
                    assert cells[column] == ""
                elif isinstance(value, str):
                    assert cells[column] == value
                else:
                    assert float(cells[column]) == pytest.approx(value, rel=1e-3)


def test_extra_columns_and_awkward_text_are_kept_in_the_table(tmp_path):
    rows = [{"kld": 0.01, "method": "RTN | per channel", "hardware": "CPU: 2 threads"}]
    _, body = _split(_card(tmp_path, results=rows, method="RTN", calibration=None).read_text())
    header, _, row = _table(body, "Results")
    assert header == ["method", "kld", "hardware"]
    assert row[0] == "RTN \\| per channel" and row[2] == "CPU: 2 threads"
    assert "None:" in body.split("## Calibration data", 1)[1]  # a method without calibration data says so


def test_library_versions_table(tmp_path):
    _, body = _split(_card(tmp_path).read_text())
    versions = dict(_table(body, "Library versions")[2:])
    assert versions == VERSIONS
    _, empty = _split(_card(tmp_path, library_versions={}).read_text())
    assert "quantlesson.versions.installed()" in empty


@pytest.mark.parametrize("bits", [0, -4, float("nan"), True, "4"])
def test_bits_must_be_positive(tmp_path, bits):
    with pytest.raises(LessonError, match="bits"):
        _card(tmp_path, bits=bits)
    assert not (tmp_path / "README.md").exists()


def test_missing_folder_and_empty_results(tmp_path):
    with pytest.raises(LessonError, match="save the quantized model there first"):
        _card(tmp_path / "not-saved-yet")
    for empty in ([], pd.DataFrame(), [{}]):
        with pytest.raises(LessonError, match="results is empty"):
            _card(tmp_path, results=empty)
    with pytest.raises(LessonError, match="DataFrame or a list of dicts"):
        _card(tmp_path, results="kld 0.1")
    with pytest.raises(LessonError, match="group_size"):
        _card(tmp_path, group_size=0)
    assert list(tmp_path.iterdir()) == []


class _Unprintable:
    def __str__(self):
        raise RuntimeError("cannot render this value")


def test_a_card_that_fails_to_render_leaves_the_old_one(tmp_path):
    good = _card(tmp_path).read_text()
    with pytest.raises(RuntimeError, match="cannot render"):
        _card(tmp_path, results=[{"method": "GPTQ", "note": _Unprintable()}])
    assert (tmp_path / "README.md").read_text() == good
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]


def test_a_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    good = _card(tmp_path).read_text()

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        _card(tmp_path, method="AWQ")
    assert (tmp_path / "README.md").read_text() == good
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]


def test_push_to_hub_command_is_runnable_python(tmp_path):
    snippet = modelcard.push_to_hub_command(tmp_path / "my model", "me/SmolLM2-135M-GPTQ-4bit")
    compile(snippet, "<snippet>", "exec")
    assert "from huggingface_hub import HfApi" in snippet
    assert '"me/SmolLM2-135M-GPTQ-4bit"' in snippet and str(tmp_path / "my model") in snippet
    assert "upload_folder" in snippet and "create_repo" in snippet and "exist_ok=True" in snippet
    for bad in ("no-owner", "a/b/c", "/name", ""):
        with pytest.raises(LessonError, match="owner/name"):
            modelcard.push_to_hub_command(tmp_path, bad)


def test_a_local_base_model_is_named_not_linked(tmp_path):
    card = modelcard.write_model_card(
        tmp_path, base_model="embedded", method="RTN", bits=4, group_size=128, calibration=None,
        results=[{"method": "RTN", "perplexity": 1.0, "kld": 0.1, "top1": 0.9}], library_versions={"torch": "2.13.0"},
    ).read_text()
    assert "huggingface.co/embedded" not in card and "`embedded`" in card
    linked = modelcard.write_model_card(
        tmp_path, base_model="HuggingFaceTB/SmolLM2-135M-Instruct", method="RTN", bits=4, group_size=64, calibration=None,
        results=[{"method": "RTN", "perplexity": 1.0, "kld": 0.1, "top1": 0.9}], library_versions={"torch": "2.13.0"},
    ).read_text()
    assert "(https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct)" in linked
