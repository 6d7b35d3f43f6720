"""ExLlamaV3 from the lesson: convert a model to EXL3, run it, and measure it like every other variant.

ExLlamaV3 needs an NVIDIA GPU of compute capability 8.0 or newer (Ampere, Ada, Hopper, Blackwell: no T4,
no ROCm). The PyPI wheel carries no compiled kernels: its CUDA extension compiles at the first import
(about five minutes on the lesson's H200 machine). :func:`available` says whether it can run here, with a
message that says what to do when not. The trellis idea under EXL3 is taught from scratch in
:mod:`quantlesson.scratch.trellis`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

from quantlesson.errors import LessonError
from quantlesson.exl2 import decode_rate
from quantlesson.models import no_gpu_message

VERSION = "1.6.5"


def available() -> bool:
    """True if ExLlamaV3 can run here; otherwise print why not (no GPU, too old a GPU, not installed) and return False."""
    if not torch.cuda.is_available():
        print(no_gpu_message("ExLlamaV3"))
        return False
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        print(f"ExLlamaV3 needs compute capability 8.0 or newer (Ampere); {torch.cuda.get_device_name()} has {major}.{minor}. "
              "On this GPU use GGUF (llama.cpp), bitsandbytes or GPTQ instead (see 'Which method when').")  # fmt: skip
        return False
    try:
        import exllamav3  # noqa: F401  (compiles its CUDA extension the first time)
    except ImportError as error:
        print(f"ExLlamaV3 is not installed ({error}): pip install exllamav3=={VERSION} (see the episode's setup notes).")
        return False
    return True


def check_bits(bits: float, head_bits: int) -> None:
    """ExLlamaV3's converter takes 1-8 bits per weight for the layers, and 1-8 or 16 (unquantized) for the head."""
    if not 1.0 <= bits <= 8.0:
        raise LessonError(f"bits={bits}: EXL3 targets lie between 1 and 8 bits per weight.")
    if head_bits != 16 and not 1 <= head_bits <= 8:
        raise LessonError(f"head_bits={head_bits}: the head takes 1 to 8 bits, or 16 to stay unquantized.")


def write_calibration(calibration: torch.Tensor, path: str | Path) -> Path:
    """ExLlamaV3 reads calibration tokens from a safetensors file: ``input_ids``, ``[rows, columns]``."""
    from safetensors.torch import save_file

    if calibration.dim() != 2:
        raise LessonError(f"calibration has shape {tuple(calibration.shape)}: pass token windows, [rows, columns].")
    path = Path(path)
    save_file({"input_ids": calibration.to(torch.int64).contiguous()}, str(path))
    return path


def convert(model_folder: str | Path, work: str | Path, bits: float, calibration: torch.Tensor | None = None,
            head_bits: int = 6, rows: int = 16, columns: int = 512) -> Path:  # fmt: skip
    """Quantize a transformers model folder to EXL3 at ``bits`` per weight; returns the EXL3 folder.

    ``calibration`` (token windows, ``[rows, columns]``) replaces ExLlamaV3's own bundled text mix, of which
    it otherwise takes ``rows`` x ``columns`` tokens (its default is 250 x 2048). Each target is a whole
    run: EXL3 has no measurement pass to share between targets.
    """
    check_bits(bits, head_bits)
    model_folder, work = Path(model_folder), Path(work)
    if not (model_folder / "config.json").exists():
        raise LessonError(f"{model_folder} holds no config.json: pass a folder written by save_pretrained.")
    out = work / f"exl3-{bits:.2f}bpw"
    extra = []
    if calibration is not None:
        work.mkdir(parents=True, exist_ok=True)
        rows, columns = calibration.shape
        extra = ["-cd", str(write_calibration(calibration, work / "calibration.safetensors"))]
    command = [sys.executable, "-m", "exllamav3.conversion.convert_model", "-i", str(model_folder), "-o", str(out),
               "-w", str(work / f"job-{bits:.2f}"), "-b", str(bits), "-hb", str(head_bits), "-cr", str(rows),
               "-cc", str(columns), "-cpi", "100000", *extra]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    # the converter prints " !! Error: ..." and still exits 0 when its arguments are refused
    if result.returncode != 0 or not (out / "config.json").exists() or "!! Error" in result.stdout:
        raise LessonError(f"convert_model failed (exit {result.returncode}):\n{(result.stdout + result.stderr)[-3000:]}")
    return out


def stored_bits(folder: str | Path) -> float:
    """The layers' bits per weight that ExLlamaV3 wrote into the folder's config.json (the head excluded)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    if config.get("quantization_config", {}).get("quant_method") != "exl3":
        raise LessonError(f"{folder} is not an EXL3 model (its config.json has no exl3 quantization_config).")
    return float(config["quantization_config"]["bits"])


class ExLlamaV3Model(torch.nn.Module):
    """An EXL3 (or unquantized) model run by ExLlamaV3, callable like a transformers model for :mod:`quantlesson.evaluate`."""

    def __init__(self, folder: str | Path, max_tokens: int = 2048):
        super().__init__()
        from exllamav3 import Cache, Config, Model, Tokenizer

        self.config = Config.from_directory(str(folder))
        self.model = Model.from_config(self.config)
        self.cache = Cache(self.model, max_num_tokens=-(-max_tokens // 256) * 256)  # pages of 256 tokens, before load
        self.model.load(device="cuda:0")
        self.tokenizer = Tokenizer.from_config(self.config)
        self.vocab_size = self.config.vocab_size
        self._device = torch.nn.Parameter(torch.empty(0, device="cuda"), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, **_) -> types.SimpleNamespace:
        logits = self.model.forward(input_ids, {"attn_mode": "flash_attn_nc"})  # no cache: the whole window at once
        return types.SimpleNamespace(logits=logits[..., : self.vocab_size].float())  # [batch, seq, vocab]; the head may be padded

    def decode_speed(self, prompt: torch.Tensor, new_tokens: int = 128) -> float:
        """Greedy decode tokens per second with ExLlamaV3's generator at batch 1, prefill excluded."""
        from exllamav3 import ArgmaxSampler, Generator, Job

        generator = Generator(model=self.model, cache=self.cache, tokenizer=self.tokenizer, max_batch_size=1)

        def run(n: int) -> float:
            generator.enqueue(Job(input_ids=prompt[None].cpu(), max_new_tokens=n, min_new_tokens=n,
                                  sampler=ArgmaxSampler(), stop_conditions=None))  # fmt: skip
            torch.cuda.synchronize()
            start = time.perf_counter()
            while generator.num_remaining_jobs():
                generator.iterate()
            torch.cuda.synchronize()
            return time.perf_counter() - start

        run(new_tokens)  # warm-up: the same work once, untimed (the generator captures its graphs here)
        return decode_rate(run, new_tokens)


def twin_speed(name: str, tokenizer, work: str | Path, bits: float = 4.0) -> dict:
    """Convert a shape twin (random weights, a real model's shapes) to EXL3 and time its decode at batch 1.

    ``tokenizer`` is any tokenizer the converter can read (the twin's text is noise: only the speed counts).
    Returns the folder's size, the conversion's seconds and the decode tokens/s, with the bandwidth bound
    for the bytes the GPU reads per token (ExLlamaV3, like ExLlamaV2, looks embeddings up in CPU memory).
    """
    from quantlesson import exl2, measure, models

    work = Path(work)
    twin = models.twin(name, dtype=torch.bfloat16, device="cpu")
    twin.save_pretrained(work / "hf")
    tokenizer.save_pretrained(work / "hf")
    del twin
    start = time.perf_counter()
    folder = convert(work / "hf", work, bits, head_bits=6, rows=8, columns=256)
    seconds = time.perf_counter() - start
    size = measure.size_on_disk(folder)
    runner = ExLlamaV3Model(folder)
    tokens_per_s = runner.decode_speed(torch.arange(64), new_tokens=256)
    gpu_bytes = exl2.gpu_bytes_per_token(size, models.twin_config(name))
    bound = measure.copy_bandwidth("cuda") / gpu_bytes
    del runner
    return {"size_bytes": size, "quant_seconds": seconds, "decode_tok_s": tokens_per_s, "gpu_bytes": gpu_bytes, "bound_tok_s": bound}


def twin_row(name: str, twin: dict, bits: float = 4.0) -> dict:
    """The GPU table's row for a :func:`twin_speed` result: ``report.record(path, **twin_row(name, twin))``."""
    return {"episode": "07c-exl3", "model": f"{name} (shape twin)", "bits": round(bits), "bits_per_weight": bits,
            "method": f"EXL3 {bits:.1f} bpw, ExLlamaV3 generator, batch 1", "size_mb": round(twin["size_bytes"] / 1e6, 1),
            "decode_tok_s": round(twin["decode_tok_s"], 1), "quant_seconds": round(twin["quant_seconds"], 1)}  # fmt: skip
