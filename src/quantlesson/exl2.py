"""ExLlamaV2 from the lesson: convert a model to EXL2, run it, and measure it like every other variant.

ExLlamaV2 needs an NVIDIA GPU: its CUDA extension compiles at the first import
(about two minutes) and the package does not import without CUDA. :func:`available`
says whether it can run here, with a message that says what to do when not.
"""

from __future__ import annotations

import subprocess
import sys
import time
import types
from pathlib import Path

import torch

from quantlesson import compat
from quantlesson.errors import LessonError
from quantlesson.models import no_gpu_message


def available() -> bool:
    """True if ExLlamaV2 can run here; otherwise print why not (no GPU, or not installed) and return False."""
    if not torch.cuda.is_available():
        print(no_gpu_message("ExLlamaV2"))
        return False
    compat.exllamav2_causal_attention()  # before the import: ExLlamaV2's SDPA path is not causal (see compat)
    try:
        import exllamav2  # noqa: F401  (compiles its CUDA extension the first time)
    except ImportError as error:
        print(f"ExLlamaV2 is not installed ({error}): pip install exllamav2==0.3.2 (see the episode's setup notes).")
        return False
    return True


def gpu_bytes_per_token(size_on_disk: float, config) -> float:
    """Bytes of an EXL2 model the GPU reads per decoded token: the folder's size less the embedding table.

    ExLlamaV2 keeps the token-embedding table (float16, ``vocab_size x hidden_size``) in CPU memory and
    looks up one row per token there; the layers and the head are read on the GPU. ``config`` is the
    model's transformers config (for a shape twin: ``models.twin_config(name)``).
    """
    embedding = config.vocab_size * config.hidden_size * 2
    if size_on_disk <= embedding:
        raise LessonError(f"{size_on_disk:.0f} bytes is no larger than the embedding table alone ({embedding} bytes): "
                          "pass the size of the whole EXL2 folder, in bytes.")  # fmt: skip
    return size_on_disk - embedding


def write_calibration(texts: list[str], path: str | Path) -> Path:
    """ExLlamaV2 reads calibration text from a Parquet file: one text per row."""
    import pandas as pd

    path = Path(path)
    pd.DataFrame({"text": texts}).to_parquet(path, engine="fastparquet")
    return path


def _convert(*arguments: str) -> str:
    compat.exllamav2_causal_attention()  # the converter's forward passes need causal attention too
    command = [sys.executable, "-m", "exllamav2.conversion.convert_exl2", *arguments]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise LessonError(f"convert_exl2 failed (exit {result.returncode}):\n{(result.stdout + result.stderr)[-3000:]}")
    return result.stdout


def measure(model_folder: Path, work: Path, calibration: Path, length: int = 256, rows: int = 16) -> Path:
    """The measurement pass alone: every layer's error under every candidate setting, saved as JSON."""
    compat.exllamav2_rope_theta(model_folder)  # transformers 5 moved rope_theta where ExLlamaV2 does not look
    out = work / "measurement.json"
    _convert("-i", str(model_folder), "-o", str(work / "measuring"), "-nr", "-om", str(out), "-c", str(calibration),
             "-ml", str(length), "-mr", str(rows), "-l", str(length))  # fmt: skip
    return out


def convert(model_folder: Path, work: Path, bits: float, measurement: Path, calibration: Path, length: int = 256,
            rows: int = 32, head_bits: int = 6) -> Path:  # fmt: skip
    """Quantize to a target bits per weight, reusing a measurement; returns the folder of the EXL2 model."""
    out = work / f"exl2-{bits:.2f}bpw"
    _convert("-i", str(model_folder), "-o", str(work / f"job-{bits:.2f}"), "-nr", "-m", str(measurement), "-cf", str(out),
             "-b", str(bits), "-hb", str(head_bits), "-c", str(calibration), "-l", str(length), "-r", str(rows))  # fmt: skip
    return out


class ExLlamaV2Model(torch.nn.Module):
    """An EXL2 model run by ExLlamaV2, callable like a transformers model for :mod:`quantlesson.evaluate`."""

    def __init__(self, folder: str | Path, max_seq_len: int = 2048):
        super().__init__()
        compat.exllamav2_causal_attention()
        compat.exllamav2_rope_theta(folder)  # also for an unquantized folder, which the converter never saw
        from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config

        config = ExLlamaV2Config(str(folder))
        config.max_seq_len = max_seq_len
        self.model = ExLlamaV2(config)
        self.cache = ExLlamaV2Cache(self.model, max_seq_len=max_seq_len, lazy=True)
        self.model.load_autosplit(self.cache, progress=False)
        self.config = config
        self._device = torch.nn.Parameter(torch.empty(0, device="cuda"), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, **_) -> types.SimpleNamespace:
        logits = self.model.forward(input_ids.cpu())  # no cache: the whole window at once (ids on the CPU: ExLlamaV2 embeds there)
        return types.SimpleNamespace(logits=logits.float())

    def decode_speed(self, prompt: torch.Tensor, new_tokens: int = 128) -> float:
        """Greedy decode tokens per second with ExLlamaV2's dynamic generator (unpaged: no flash-attn needed), prefill excluded."""
        from exllamav2 import ExLlamaV2Tokenizer
        from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler

        generator = ExLlamaV2DynamicGenerator(model=self.model, cache=self.cache, tokenizer=ExLlamaV2Tokenizer(self.config), paged=False)
        settings = ExLlamaV2Sampler.Settings.greedy()

        def run(n: int) -> float:
            generator.enqueue(ExLlamaV2DynamicJob(input_ids=prompt[None].cpu(), max_new_tokens=n, min_new_tokens=n,
                                                  gen_settings=settings, stop_conditions=[]))  # fmt: skip
            torch.cuda.synchronize()
            start = time.perf_counter()
            while generator.num_remaining_jobs():
                generator.iterate()
            torch.cuda.synchronize()
            return time.perf_counter() - start

        run(new_tokens)  # warm-up: the same work once, untimed
        return decode_rate(run, new_tokens)


def decode_rate(run, new_tokens: int) -> float:
    """Tokens per second of decoding alone: ``run(n)`` times a prompt's prefill and ``n`` new tokens.

    The prefill costs the same in both runs, so the difference of a run of ``new_tokens`` and a run of
    one token is the time of ``new_tokens - 1`` decode steps.
    """
    if new_tokens < 2:
        raise LessonError(f"new_tokens={new_tokens}: decode speed needs at least 2 new tokens (one is the prefill's).")
    return (new_tokens - 1) / (run(new_tokens) - run(1))
