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
    # (no assertion on the timing itself: on a loaded machine t(6) - t(1) can come out at or below zero)
    assert result.decode_tokens_per_s == pytest.approx(1000 / result.decode_ms_per_token)


def test_latency_refuses_too_few_tokens(tiny_llama):
    with pytest.raises(LessonError, match="at least 2"):
        measure.latency(tiny_llama, torch.arange(4), new_tokens=1)


def test_peak_memory_sees_an_allocation():
    """In a fresh process (a long-lived one may reuse memory it already holds, which RSS cannot see)."""
    import subprocess
    import sys

    code = (
        "import torch\nfrom quantlesson import measure\n"
        "import time\nwith measure.PeakMemory() as memory:\n    block = torch.ones(64 * 2**20 // 4)\n"
        "    time.sleep(0.05)  # ten sampling intervals: a busy machine may not sample the block's last pages sooner\n"
        "    del block\n"
        "print(memory.increase)"
    )
    increase = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1])
    assert increase >= 48 * 2**20  # the 64 MiB block, freed inside the block: only the peak saw it


def test_roofline_is_bandwidth_over_bytes():
    assert measure.roofline_tokens_per_s(2e9, 4e12) == 2000


def test_static_decoder_makes_the_same_tokens_as_generate(tiny_llama):
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = tiny_llama.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=10, min_new_tokens=10, pad_token_id=0)[:, 12:]
    decoder = measure.StaticDecoder(tiny_llama, ids, max_new_tokens=10)
    assert torch.equal(decoder.tokens(9), expected)
    with pytest.raises(LessonError, match="cache is full"):
        decoder.step()


def test_static_decode_speed_checks_tokens_and_reports_the_bound(tiny_llama):
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(1))
    speed = measure.static_decode_speed(tiny_llama, ids, new_tokens=6, graph=False, check_tokens=8, bandwidth=1e10)
    assert speed.same_tokens == 8 and speed.batch == 1
    assert speed.bytes_per_step == measure.decode_bytes(tiny_llama)
    assert speed.roofline_fraction == pytest.approx(speed.tokens_per_s / (1e10 / speed.bytes_per_step))


def test_capture_without_a_gpu_is_a_clear_error(tiny_llama):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    decoder = measure.StaticDecoder(tiny_llama, torch.zeros(1, 4, dtype=torch.long), max_new_tokens=4)
    with pytest.raises(LessonError, match="NVIDIA GPU"):
        decoder.capture()


def test_peak_memory_counts_a_copy_after_temporaries_were_freed():
    """A long-lived process: memory freed earlier would be reused unseen; PeakMemory hands it back first."""
    import subprocess
    import sys

    code = (
        "import copy, torch\nfrom transformers import LlamaConfig, LlamaForCausalLM\nfrom quantlesson import measure\n"
        "model = LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,"
        " num_attention_heads=4, num_key_value_heads=2))\n"
        "ids, copies = torch.randint(0, 4096, (1, 512)), []\n"
        "for _ in range(3):\n"
        "    with torch.no_grad():\n        model(ids).logits.log_softmax(-1)\n"  # temporaries, freed and kept for reuse
        "    with measure.PeakMemory() as memory:\n        copies.append(copy.deepcopy(model))\n"
        "    print(memory.increase)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    copy_bytes = 4 * (2 * 4096 * 256 + 4 * (2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 768))  # embeddings, head, layers
    for increase in map(int, result.stdout.split()):
        assert increase >= 0.8 * copy_bytes  # every copy shows, though freed memory was at hand


def test_the_bandwidth_behind_a_speed_table_is_recovered(tiny_llama):
    """speed.measured_bandwidth reads back the bandwidth a benchmark's bounds were computed with."""
    import pandas as pd

    from quantlesson import speed

    ids = torch.randint(0, 128, (1, 8))
    run = measure.static_decode_speed(tiny_llama, ids, new_tokens=4, graph=False, check_tokens=4, bandwidth=3e10)
    table = pd.DataFrame([{"roofline_tokens_per_s": run.roofline_tokens_per_s, "gb_per_step": run.bytes_per_step / 1e9}])
    assert speed.measured_bandwidth(table) == pytest.approx(3e10)


def test_peak_memory_also_times_its_block():
    import time

    with measure.PeakMemory() as memory:
        time.sleep(0.05)
    assert 0.05 <= memory.seconds < 5
