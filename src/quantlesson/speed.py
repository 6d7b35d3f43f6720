"""Decode speed on real model shapes, on an NVIDIA GPU: the measurements behind the lesson's roofline plot.

Each row times one way of decoding a shape twin (random weights, the real model's
shapes) at one batch size, next to the memory-bandwidth bound:

* ``generate (eager)``: plain ``model.generate``, the way most tutorials time models;
* ``static cache + CUDA graph``: one decode step captured and replayed (no Python per token);
* ``... + torch.compile``: the captured step's kernels fused by the compiler;
* the same two for 4-bit weights on PyTorch's int4 kernel (:mod:`quantlesson.kernels`).

On a machine without an NVIDIA GPU the functions print what they need and return nothing.
"""

from __future__ import annotations

import gc

import pandas as pd
import torch

from quantlesson import measure, models

SPEED_COLUMNS = ["model", "weights", "path", "batch", "ms_per_step", "tokens_per_s", "gb_per_step", "roofline_tokens_per_s", "roofline_fraction", "same_tokens", "gpu"]


def gpu_available() -> bool:
    """True where an NVIDIA GPU is visible; otherwise print what to do instead."""
    if torch.cuda.is_available():
        return True
    print(models.no_gpu_message("This measurement"))
    return False


def device_bandwidth(megabytes: int = 2048) -> float | None:
    """The GPU's measured copy bandwidth in bytes/s (``None`` without a GPU)."""
    if not gpu_available():
        return None
    bandwidth = measure.copy_bandwidth("cuda", megabytes=megabytes, repeats=10)
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {bandwidth / 1e12:.2f} TB/s (bytes read + written)")
    return bandwidth


def _row(name: str, weights: str, speed: measure.DecodeSpeed) -> dict:
    return {
        "model": name, "weights": weights, "path": speed.path, "batch": speed.batch,
        "ms_per_step": speed.ms_per_step, "tokens_per_s": speed.tokens_per_s, "gb_per_step": speed.bytes_per_step / 1e9,
        "roofline_tokens_per_s": speed.roofline_tokens_per_s, "roofline_fraction": speed.roofline_fraction,
        "same_tokens": speed.same_tokens, "gpu": torch.cuda.get_device_name(),
    }


def measured_bandwidth(runs: pd.DataFrame) -> float:
    """The bandwidth (bytes/s) a :func:`decode_benchmark` table's bounds were computed with: bound x bytes per step."""
    return float((runs["roofline_tokens_per_s"] * runs["gb_per_step"] * 1e9).iloc[0])


def decode_benchmark(
    twin: str, bandwidth: float, batches: tuple[int, ...] = (1,), new_tokens: int = 128, prompt_tokens: int = 64,
    int4_group_size: int = 128, compile: bool = True, plain_generate: bool = True,
) -> pd.DataFrame | None:  # fmt: skip
    """Time every decode path of one shape twin in 16 bits and in 4 bits; one row per path and batch.

    16 bits is bfloat16, or float16 on a GPU older than Ampere, where the int4 kernel does not run (skipped, with a message).
    """
    from quantlesson import kernels

    if not gpu_available():
        return None
    rows = []
    dtype = models.default_dtype("cuda")  # bfloat16, or float16 on a GPU older than Ampere (T4, V100)
    kinds = [models.dtype_name(dtype)]
    if models.can_run("PyTorch's int4 kernel (_weight_int4pack_mm)", 8, 0):  # else it prints why it is skipped
        kinds.append(f"int4 g{int4_group_size}")
    for weights in kinds:
        model = models.twin(twin, dtype=torch.bfloat16 if weights.startswith("int4") else dtype, device="cuda")
        if weights.startswith("int4"):
            kernels.quantize_to_int4pack(model, int4_group_size)
        for batch in batches:
            ids = torch.randint(0, model.config.vocab_size, (batch, prompt_tokens), device="cuda",
                                generator=torch.Generator("cuda").manual_seed(batch))
            if plain_generate and batch == 1:
                rows.append(_row(twin, weights, measure.generate_speed(model, ids, new_tokens=32, bandwidth=bandwidth)))
            rows.append(_row(twin, weights, measure.static_decode_speed(model, ids, new_tokens, graph=True, bandwidth=bandwidth)))
            if compile:
                rows.append(_row(twin, weights, measure.static_decode_speed(model, ids, new_tokens, graph=True, compile=True, bandwidth=bandwidth)))
            print("  ".join(f"{r['path']} b{r['batch']}: {r['tokens_per_s']:.0f} tok/s" for r in rows[-(2 + (plain_generate and batch == 1)):]))
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return pd.DataFrame(rows, columns=SPEED_COLUMNS)


def bitsandbytes_benchmark(twin: str = "Llama-3.2-1B", bandwidth: float | None = None, new_tokens: int = 64) -> pd.DataFrame | None:
    """Memory and decode speed of a shape twin in 16 bits, NF4 (double quant) and LLM.int8() with bitsandbytes on a GPU.

    16 bits (also NF4's compute dtype) is bfloat16, or float16 on a GPU older than Ampere.

    Each is timed with plain ``generate`` and, where its kernels allow, with a captured decode step.
    """
    import tempfile

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if not gpu_available():
        return None
    folder = tempfile.mkdtemp(prefix="twin-")
    half = models.default_dtype("cuda")  # bfloat16, or float16 on a GPU older than Ampere (T4, V100)
    models.twin(twin, dtype=half, device="cuda").save_pretrained(folder)
    configs = {
        models.dtype_name(half): (None, half),
        "NF4 + double quant": (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                                  bnb_4bit_compute_dtype=half), half),
        "LLM.int8()": (BitsAndBytesConfig(load_in_8bit=True), torch.float16),
    }
    rows = []
    for weights, (config, dtype) in configs.items():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map="cuda", quantization_config=config).eval()
        gigabytes = sum(measure.memory_by_kind(model).values()) / 1e9
        ids = torch.randint(0, model.config.vocab_size, (1, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        speeds = [measure.generate_speed(model, ids, new_tokens=32, bandwidth=bandwidth)]
        note = ""
        try:
            speeds.append(measure.static_decode_speed(model, ids, new_tokens, graph=True, bandwidth=bandwidth))
        except Exception as error:  # some kernels cannot be captured in a CUDA graph
            note = f"CUDA graph capture failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
        for speed in speeds:
            rows.append({**_row(twin, weights, speed), "memory_gb": gigabytes, "note": note if speed is speeds[0] else ""})
        print(f"{weights}: {gigabytes:.2f} GB; " + "; ".join(f"{s.path}: {s.tokens_per_s:.0f} tok/s" for s in speeds) + (f" ({note})" if note else ""))
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return pd.DataFrame(rows)
