"""Workarounds for bugs in the libraries the lesson uses: each in one place, linked upstream, tested.

Every workaround here has a test in ``tests/test_compat.py`` that shows the
library still needs it; when that test starts failing, the library has been
fixed and the workaround can go.
"""

from __future__ import annotations

import os


def gptqmodel_cpu_workers() -> None:
    """Let GPTQModel quantize on a machine with two CPU cores. Call before ``import gptqmodel``.

    GPTQModel 7.6 sizes its CPU thread pool from the core count and then asks for two
    model-loading workers from it; on a 2-core machine the pool has one, and quantizing fails
    with ``ValueError: Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu'
    only has 1`` (raised in ``gptqmodel/utils/threadx.py``,
    https://github.com/ModelCloud/GPTQModel/blob/main/gptqmodel/utils/threadx.py). GPTQModel's
    own test suite sets ``GPTQMODEL_CPU_WORKERS=2`` for the same reason. Setting the variable
    to at least 2 (we use the core count) avoids it; a value you set yourself is kept.
    """
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))


def bitsandbytes_keep_saveable(model) -> int:
    """Keep a bitsandbytes 4-bit model saveable after it has run on a CPU. Returns how many layers it changed.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks each 4-bit weight into a CPU-specific layout at
    the layer's first forward pass (``_convert_weight_packed_for_cpu``), and converting it back when the
    model is saved is only a best-effort inverse: a model saved after it has run, then reloaded, computes
    different logits (the lesson's test measures it). The same missing inverse is bitsandbytes issue
    https://github.com/bitsandbytes-foundation/bitsandbytes/issues/2078 (``Params4bit.to`` skips it).
    Switching the repacking off keeps the stored layout, at some CPU speed; or save before running.
    """
    changed = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu") and module.support_avx512bf16_for_cpu:
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def llmcompressor_awq_on_cpu() -> bool:
    """Let llm-compressor's AWQ run on a machine without a GPU. Returns True if it changed anything.

    llm-compressor 0.14 pins the cached inputs of each block in page-locked memory before AWQ's grid
    search (``IntermediatesCache.pin_memory``, added in
    https://github.com/vllm-project/llm-compressor/pull/2813 to speed up copies to the GPU).
    Pinning needs an accelerator: on a CPU-only PyTorch ``oneshot`` with ``AWQModifier`` fails with
    ``RuntimeError: Cannot access accelerator device when none is available``. Pinning only speeds
    up host-to-GPU copies, so where there is no accelerator we skip it; with a GPU nothing changes.
    """
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available() or getattr(IntermediatesCache.pin_memory, "_lesson_skip", False):
        return False

    def pin_memory(self, batch_index: int, input_names: list[str] | None = None) -> None:
        """No accelerator: nothing to pin for (quantlesson.compat.llmcompressor_awq_on_cpu)."""

    pin_memory._lesson_skip = True
    IntermediatesCache.pin_memory = pin_memory
    return True


def exllamav2_rope_theta(model_folder) -> bool:
    """Give ExLlamaV2 a model's RoPE base in the form it reads. Returns True if it changed ``config.json``.

    transformers 5 saves the RoPE base inside ``rope_parameters`` ({"rope_theta": ...}) instead of as a
    top-level ``rope_theta`` (https://huggingface.co/docs/transformers/main/en/internal/rope_utils).
    ExLlamaV2 0.3.2 reads only the top-level key and silently falls back to its default of 10,000:
    for the lesson's model (base 100,000) every position is rotated wrongly and the quantized model's
    KL divergence from the original was 0.2 at every bit width (other projects hit the same change, e.g.
    https://github.com/InternLM/lmdeploy/pull/4304). Copying the value to the top level fixes it.
    """
    import json
    from pathlib import Path

    path = Path(model_folder) / "config.json"
    config = json.loads(path.read_text())
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if theta is None or config.get("rope_theta") == theta:
        return False
    config["rope_theta"] = theta
    path.write_text(json.dumps(config, indent=2) + "\n")
    return True


def exllamav2_causal_attention() -> bool:
    """Keep ExLlamaV2's attention causal where flash-attn is not installed. Returns True if it changed anything.

    Without flash-attn (and xformers) ExLlamaV2 0.3.2 computes attention with PyTorch's SDPA, and there
    ``if self.layer_idx in attn_params.block_diag_layers or causal:`` takes the block-diagonal mask,
    which is ``None`` unless sequences were packed (``exllamav2/attn.py``, ``_attn_torch``; since commit
    https://github.com/turboderp-org/exllamav2/commit/2e630aefdd48eb1006efac84559501056e8b83b9). SDPA then
    gets no mask and no ``is_causal``: every position of a multi-token forward pass (perplexity, prefill,
    and the converter's own measurement and quantization passes) attends to the tokens after it. The
    lesson saw it as a KL divergence near 0.16 at every bit width, 2.5 to 6.0. Decoding one token at a
    time is not affected. ``EXLLAMA_NO_SDPA=1`` sends ExLlamaV2 to its matmul attention, which builds
    the causal mask; the variable is inherited by the converter's subprocesses. Call before importing
    exllamav2 (an already imported one is switched too). No upstream issue was found; with flash-attn
    installed, the usual setup, the faulty branch is not taken.
    """
    import importlib.util
    import sys

    if importlib.util.find_spec("flash_attn") is not None or os.environ.get("EXLLAMA_NO_SDPA"):
        return False
    os.environ["EXLLAMA_NO_SDPA"] = "1"
    attn = sys.modules.get("exllamav2.attn")
    if attn is not None:
        attn.has_lower_right_sdpa = False
    return True


def gguf_tokenizer_as_byte_level_bpe(tokenizer_json, digits_alone: bool = True) -> bool:
    """Turn the tokenizer transformers builds from a GPT-2-style GGUF back into a plain byte-level BPE.

    transformers' GGUF loader (5.x, ``integrations/ggml.py``) rebuilds a ``gpt2`` GGUF tokenizer as a BPE
    with ``byte_fallback=True`` and a SentencePiece-style decoder sequence. Saved and converted back with
    llama.cpp's ``convert_hf_to_gguf.py``, that file looks like a Llama (SentencePiece) tokenizer to
    ``gguf.vocab.LlamaHfVocab``, which writes ``tokenizer.ggml.model = "llama"`` and no merges; every
    llama.cpp program then aborts with ``std::out_of_range`` in ``llama_vocab::byte_to_token`` (the same
    misdetection as https://github.com/ggml-org/llama.cpp/pull/26803). The original (SmolLM2's
    ``tokenizer.json``) has no byte fallback, a ``ByteLevel`` decoder, and splits digits one by one
    (llama.cpp's ``smollm`` pre-tokenizer). This rewrites ``tokenizer_json`` to that form, in place, and
    returns True; a file that is already plain byte-level BPE is left alone (False).
    """
    import json
    from pathlib import Path

    path = Path(tokenizer_json)
    spec = json.loads(path.read_text())
    model = spec["model"]
    if model.get("type") != "BPE" or not model.get("byte_fallback") or (spec.get("pre_tokenizer") or {}).get("type") != "ByteLevel":
        return False
    model.update(byte_fallback=False, fuse_unk=False, unk_token=None)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    digits = [{"type": "Digits", "individual_digits": True}] if digits_alone else []
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [*digits, byte_level]}
    spec["decoder"] = dict(byte_level)
    spec["normalizer"] = None
    path.write_text(json.dumps(spec, ensure_ascii=False, indent=2) + "\n")
    return True


def gguf_special_tokens(tokenizer, gguf_file) -> dict[str, str]:
    """Give ``tokenizer`` the special tokens the GGUF file names; return those that changed (name -> token).

    transformers 5.17's GGUF loader sets SmolLM2's end-of-sequence token to ``<|im_start|>`` (id 1, the
    file's *beginning* token), where the file says ``tokenizer.ggml.eos_token_id = 2`` (``<|im_end|>``), so
    ``generate`` would not stop at the end of an answer. This reads the ids from the file and sets them.
    """
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_file)).fields
    changed = {}
    for name in ("bos", "eos", "pad", "unk"):
        key = f"tokenizer.ggml.{'unknown' if name == 'unk' else 'padding' if name == 'pad' else name}_token_id"
        if key not in fields:
            continue
        token = tokenizer.convert_ids_to_tokens(int(fields[key].parts[fields[key].data[0]][0]))
        if getattr(tokenizer, f"{name}_token") != token:
            setattr(tokenizer, f"{name}_token", token)
            changed[name] = token
    return changed
