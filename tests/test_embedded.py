"""The embedded model's build: reproducible, cached, atomic; and trained enough to tell methods apart."""

import dataclasses
import hashlib
import json

import pytest
import torch

from quantlesson import LessonError, embedded

# A recipe small enough to build twice in a test, through the same code as the real one.
TINY = embedded.Recipe(vocab_size=512, num_hidden_layers=1, intermediate_size=256, steps=3, batch_size=2, seq_len=64, warmup_steps=1)


def weights_digest(folder) -> str:
    from safetensors.torch import load_file

    tensors = load_file(folder / "model.safetensors")
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode() + tensors[name].float().numpy().tobytes())
    return digest.hexdigest()


def test_same_recipe_same_weights_and_tokenizer(tmp_path):
    first = embedded.build(TINY, tmp_path / "a", progress=False)
    second = embedded.build(TINY, tmp_path / "b", progress=False)
    assert weights_digest(first) == weights_digest(second)
    assert (first / "tokenizer.json").read_text() == (second / "tokenizer.json").read_text()
    other = embedded.build(dataclasses.replace(TINY, seed=1), tmp_path / "c", progress=False)
    assert weights_digest(other) != weights_digest(first)


def test_the_cache_key_follows_the_recipe():
    assert embedded.Recipe().key() == embedded.Recipe().key()
    assert dataclasses.replace(embedded.Recipe(), steps=301).key() != embedded.Recipe().key()


def test_a_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(embedded, "train", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        embedded.build(TINY, tmp_path / "model", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_ensure_built_reuses_a_finished_build(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLESSON_CACHE", str(tmp_path))
    folder = embedded.folder(TINY)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    monkeypatch.setattr(embedded, "build", lambda *a, **k: pytest.fail("rebuilt a cached model"))
    assert embedded.ensure_built(TINY) == folder


def test_sizes_that_break_block_quantization_are_refused(tmp_path):
    with pytest.raises(LessonError, match="multiples of 256"):
        embedded.build(dataclasses.replace(TINY, hidden_size=320), tmp_path / "m", progress=False)


def test_the_embedded_model_has_learned_something(embedded):
    """Held-out perplexity far below the vocabulary size: the model has real structure to quantize."""
    from quantlesson import data, evaluate

    model, tokenizer = embedded
    ids = data.evaluation_tokens(tokenizer, max_tokens=4096)
    assert evaluate.perplexity(model, ids, progress=False) < model.config.vocab_size / 10
