"""W8A8 FP8: weights *and* activations in E4M3, multiplied by the GPU's FP8 tensor cores (Hopper and newer).

Weight-only formats save memory traffic; W8A8 FP8 also halves the bytes the matrix multiply itself reads and
runs it on FP8 tensor cores (twice bfloat16's peak on an H100/H200). This is llm-compressor's ``FP8_DYNAMIC``
scheme, computed by ``torch._scaled_mm``:

* weights: E4M3 codes with one float32 scale per output row (:func:`quantlesson.scratch.fp8.quantize_weight`);
* activations: quantized on the fly, one scale per token (row of ``x``): ``s_x = max|x_row| / 448``;
* ``y = (x_codes @ w_codes^T) * s_x * s_w``, accumulated in float32 inside the kernel, written in bfloat16.

``torch._scaled_mm`` also runs on a CPU (slowly), so the arithmetic is testable anywhere; the speed
measurement needs an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell).
"""

from __future__ import annotations

import gc
import time

import pandas as pd
import torch

from quantlesson import measure, models
from quantlesson.errors import LessonError
from quantlesson.scratch import fp8, rtn

E4M3_MAX = 448.0


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token E4M3 codes ``[tokens, in]`` and float32 scales ``[tokens, 1]`` (an all-zero row gets scale eps).

    The cast is PyTorch's (on the GPU, every token, every layer); the from-scratch encoder gives the same bits
    (:mod:`quantlesson.scratch.minifloat`, proved in the episode).
    """
    x = x.float()
    scale = (x.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp(min=torch.finfo(torch.float32).eps)
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


class Fp8Linear(torch.nn.Module):
    """A linear layer with E4M3 weights (per-row scales) and E4M3 activations (per-token scales)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        out_features, in_features = codes.shape
        if in_features % 16 or out_features % 16:
            raise LessonError(f"torch._scaled_mm needs both widths divisible by 16 (got {out_features} x {in_features}).")
        self.in_features, self.out_features = in_features, out_features
        if codes.dtype == torch.uint8:  # the from-scratch encoder's bit patterns: the same bits as torch's E4M3
            codes = codes.view(torch.float8_e4m3fn)
        self.register_buffer("weight_t", codes.t())  # [in, out], column-major: the layout the kernel wants
        self.register_buffer("scale_t", scale.float().reshape(1, out_features))  # [1, out]
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> "Fp8Linear":
        """E4M3 codes and per-row scales of ``linear``'s weight, as the from-scratch FP8 module makes them."""
        codes, scale = fp8.quantize_weight(linear.weight.detach().float(), "channel")  # [out, in], [out, 1]
        return cls(codes, scale, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, scale = quantize_activations(x.reshape(-1, self.in_features))  # [tokens, in], [tokens, 1]
        y = torch._scaled_mm(codes, self.weight_t, scale_a=scale, scale_b=self.scale_t, out_dtype=torch.bfloat16)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def quantize_to_fp8(model: torch.nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> torch.nn.Module:
    """Replace every linear layer but ``skip`` with an :class:`Fp8Linear`, in place (the head stays in 16 bits)."""
    for name, linear in rtn.linear_layers(model, skip).items():
        rtn.replace_module(model, name, Fp8Linear.from_linear(linear).to(linear.weight.device))
    return model


def has_fp8_tensor_cores() -> bool:
    """Whether this GPU multiplies in FP8 (compute capability 8.9 or newer); if not, print what to do instead."""
    capability = models.gpu_capability()
    if capability is None or capability < (8, 9):
        found = "no GPU is visible" if capability is None else (
            f"this GPU ({torch.cuda.get_device_name()}) has compute capability {capability[0]}.{capability[1]}")
        print(f"Skipped: W8A8 FP8 needs FP8 tensor cores, compute capability 8.9 or newer (L4, L40S, RTX 40xx, H100, "
              f"H200, B200), and {found}. The page shows the outputs of a run on an H200.")
        return False
    return True


def prefill_tokens_per_s(model, input_ids: torch.Tensor, repeats: int = 5) -> float:
    """Prompt tokens processed per second by one forward pass (median of ``repeats``, after one warm-up)."""
    times = []
    with torch.inference_mode():
        for attempt in range(repeats + 1):
            torch.cuda.synchronize()
            start = time.perf_counter()
            model(input_ids=input_ids)
            torch.cuda.synchronize()
            if attempt:
                times.append(time.perf_counter() - start)
    return input_ids.numel() / sorted(times)[len(times) // 2]


def fp8_benchmark(twin: str = "Llama-3.2-1B", bandwidth: float | None = None, prompt_tokens: int = 2048,
                  new_tokens: int = 128) -> pd.DataFrame | None:  # fmt: skip
    """Prefill and captured-decode speed of one shape twin in bfloat16 and in W8A8 FP8; one row each.

    Decode is the lesson's captured step (static cache + CUDA graph, :func:`quantlesson.measure.static_decode_speed`)
    at batch 1; prefill is one forward pass over ``prompt_tokens`` tokens. Returns ``None``, with a message, where
    FP8 tensor cores are missing (no GPU, or compute capability below 8.9).
    """
    if not has_fp8_tensor_cores():
        return None
    rows = []
    for weights in ("bfloat16", "fp8 w8a8 (per-channel weights, per-token activations)"):
        model = models.twin(twin, dtype=torch.bfloat16, device="cuda")
        if weights.startswith("fp8"):
            quantize_to_fp8(model)
        generator = torch.Generator("cuda").manual_seed(0)
        prompt = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), device="cuda", generator=generator)
        decode = measure.static_decode_speed(model, prompt[:, :64], new_tokens, graph=True, bandwidth=bandwidth)
        rows.append({
            "model": twin, "weights": weights, "prefill_tokens": prompt_tokens,
            "prefill_tokens_per_s": prefill_tokens_per_s(model, prompt), "decode_tokens_per_s": decode.tokens_per_s,
            "gb_per_step": decode.bytes_per_step / 1e9, "roofline_tokens_per_s": decode.roofline_tokens_per_s,
            "same_tokens": decode.same_tokens, "gpu": torch.cuda.get_device_name(),
        })  # fmt: skip
        print(f"{weights}: prefill {rows[-1]['prefill_tokens_per_s']:,.0f} tokens/s, decode {decode.tokens_per_s:.0f} tokens/s")
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return pd.DataFrame(rows)
