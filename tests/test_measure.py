"""measure: sizes, bits per weight, latency and peak memory."""

import pytest
import torch

from quantlesson import LessonError, measure
from quantlesson.scratch import rtn


def test_size_on_disk_sums_every_file(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 1000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 234)
    assert measure.size_on_disk(tmp_path) == 1234
    assert measure.size_on_disk(tmp_path / "a.bin") == 1000


def test_size_on_disk_of_a_missing_path_says_what_to_do(tmp_path):
    with pytest.raises(LessonError, match="does not exist"):
        measure.size_on_disk(tmp_path / "nope")


def test_memory_by_dtype_matches_the_hand_computed_sum(tiny_llama):
    # tiny_llama: vocab 128, hidden 64, inter 128, 2 layers, 4 heads, 2 kv heads of 16, tied head, float32.
    attention = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64
    mlp = 3 * 64 * 128
    norms = 2 * 64
    per_layer = attention + mlp + norms
    params = 128 * 64 + 2 * per_layer + 64  # embedding (tied head counted once), layers, final norm
    inv_freq = 2 * (16 // 2)  # the rotary embedding keeps inv_freq and original_inv_freq (float32 buffers)
    assert measure.memory_by_dtype(tiny_llama) == {"float32": 4 * (params + inv_freq)}


def test_memory_by_kind_adds_up_and_finds_quantized_layers(tiny_llama):
    import copy

    kinds = measure.memory_by_kind(tiny_llama)
    assert sum(kinds.values()) == sum(measure.memory_by_dtype(tiny_llama).values())
    assert kinds["quantized linear"] == 0 and kinds["norm"] == 4 * (2 * 2 * 64 + 64)
    quantized = rtn.quantize_model(copy.deepcopy(tiny_llama), bits=4, group_size=32)
    kinds_q = measure.memory_by_kind(quantized)
    assert kinds_q["quantized linear"] > 0 and kinds_q["linear"] == 0
    assert kinds_q["embedding & head"] == kinds["embedding & head"]


@pytest.mark.parametrize("bits,group_size,expected", [(4, 32, 4 + 32 / 32), (4, 64, 4 + 32 / 64), (8, 32, 8 + 32 / 32)])
def test_bits_per_weight_counts_codes_and_scales(tiny_llama, bits, group_size, expected):
    import copy

    quantized = rtn.quantize_model(copy.deepcopy(tiny_llama), bits=bits, group_size=group_size)  # float32 scales
    assert measure.bits_per_weight(quantized) == pytest.approx(expected)
    assert measure.bits_per_weight(tiny_llama) == 32


def test_decode_bytes_skips_the_embedding_lookup_but_not_the_tied_head(tiny_llama):
    total = sum(measure.memory_by_dtype(tiny_llama).values())
    assert measure.decode_bytes(tiny_llama) == total  # tied: the head reads the embedding matrix
    from transformers import LlamaForCausalLM

    untied = LlamaForCausalLM(tiny_llama.config.__class__(**{**tiny_llama.config.to_dict(), "tie_word_embeddings": False}))
    assert measure.decode_bytes(untied) == sum(measure.memory_by_dtype(untied).values()) - 128 * 64 * 4


def test_latency_counts_exactly_the_tokens_and_synchronises(tiny_llama, monkeypatch):
    synced, made = [], []
    real_generate = measure._generate
    monkeypatch.setattr(measure, "_synchronize", lambda device: synced.append(device))
    monkeypatch.setattr(measure, "_generate", lambda m, ids, n: made.append((n, real_generate(m, ids, n))) or made[-1][1])
    result = measure.latency(tiny_llama, torch.arange(10), new_tokens=6, repeats=3, warmup=1)
    assert all(asked == got for asked, got in made)  # every generate made exactly what it was asked for
    assert sorted({asked for asked, _ in made}) == [1, 6]
    assert len(synced) == 2 * 3 * 3  # before and after each of 3 timed calls, in each of 3 repeats
    assert result.prompt_tokens == 10 and result.new_tokens == 6 and result.repeats == 3
    assert result.decode_ms_per_token > 0 and result.decode_tokens_per_s == pytest.approx(1000 / result.decode_ms_per_token)


def test_latency_refuses_too_few_tokens(tiny_llama):
    with pytest.raises(LessonError, match="at least 2"):
        measure.latency(tiny_llama, torch.arange(4), new_tokens=1)


def test_peak_memory_sees_an_allocation():
    with measure.PeakMemory() as memory:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB
        block += 1
    assert memory.increase >= 32 * 2**20
    del block


def test_roofline_is_bandwidth_over_bytes():
    assert measure.roofline_tokens_per_s(2e9, 4e12) == 2000
