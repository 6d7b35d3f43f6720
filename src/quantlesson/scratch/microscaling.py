"""MXFP4 and NVFP4 from scratch: 4-bit floating-point elements (E2M1) under a shared scale per small block.

**MXFP4** (the OCP Microscaling format, gpt-oss's weights): blocks of 32 consecutive weights along the input,
each element E2M1 (0, 0.5, 1, 1.5, 2, 3, 4, 6 and negatives), one shared scale per block that is a power of two,
stored as an 8-bit exponent (E8M0, bias 127). Bits per weight: 4 + 8 / 32 = 4.25.

    exponent  X = floor(log2 amax) - 2         (the OCP rule: 2 is the exponent of E2M1's largest value, 6)
    elements  q = E2M1(w / 2^X)                 (round to nearest, saturating at ±6)

With the floor rule a block whose largest weight lies in [1.5, 2) x 2^k has amax / 2^X in [6, 8): the top of the
block saturates at 6. compressed-tensors (llm-compressor's MXFP4) rounds ``amax`` up to the next power of two when
its mantissa is 1.75 or more, trading that clipping for one unused level (``exponent_rule="round-up"``).

**NVFP4** (NVIDIA Blackwell's format): blocks of 16, each element E2M1, one scale per block stored in FP8 E4M3
(not a power of two: 3 mantissa bits), under one float32 scale for the whole tensor that brings the block scales
into E4M3's range. Bits per weight: 4 + 8 / 16 = 4.5 (plus 32 bits per tensor).

    global    G = 448 * 6 / amax(tensor)
    block     s = E4M3(G * amax(block) / 6)
    elements  q = E2M1(w / (s / G))             w ≈ q * s / G

Shapes: a weight ``[out, in]`` gives codes ``[out, in]`` (uint8, 4 bits used) and scales ``[out, in / block]``.
"""

from __future__ import annotations

import torch

from quantlesson.errors import LessonError
from quantlesson.scratch.minifloat import E2M1, E4M3, check_values, encode, decode, round_to

MX_BLOCK = 32
NV_BLOCK = 16
E8M0_BIAS = 127
EXPONENT_RULES = ("floor", "round-up")


def blocks(w: torch.Tensor, size: int) -> torch.Tensor:
    """View a ``[out, in]`` weight as ``[out, in / size, size]``, with a clear error when it does not fit."""
    if w.dim() != 2:
        raise LessonError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}: pass a linear layer's weight.")
    if w.shape[1] % size:
        raise LessonError(
            f"the weight's {w.shape[1]} input columns are not a multiple of the format's block of {size}: "
            "MXFP4 needs multiples of 32 and NVFP4 of 16 (real checkpoints leave such layers unquantized)."
        )
    check_values(w)
    return w.float().reshape(w.shape[0], -1, size)


def mx_exponent(amax: torch.Tensor, rule: str = "floor") -> torch.Tensor:
    """The shared exponent ``X`` of each block (an int32 tensor): ``2^X`` is the block's scale."""
    if rule not in EXPONENT_RULES:
        raise LessonError(f"exponent_rule={rule!r}: choose one of {EXPONENT_RULES}.")
    fraction, e = torch.frexp(amax)  # amax = fraction * 2^e, fraction in [0.5, 1): floor(log2 amax) = e - 1
    k = e - 1
    if rule == "round-up":
        k = torch.where(fraction >= 0.875, k + 1, k)  # mantissa 2 * fraction >= 1.75: round amax up to 2^(k+1)
    exponent = k - 2  # E2M1's largest value is 6 = 1.5 * 2^2
    exponent = torch.where(amax > 0, exponent, -E8M0_BIAS)  # an all-zero block: the smallest scale
    return exponent.clamp(-E8M0_BIAS, E8M0_BIAS + 1)  # what 8 bits of E8M0 hold


def mxfp4_quantize(w: torch.Tensor, exponent_rule: str = "floor", ties: str = "even") -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 codes ``[out, in]`` (uint8 E2M1 bit patterns) and block exponents ``[out, in / 32]`` (int32)."""
    groups = blocks(w, MX_BLOCK)  # [out, n_blocks, 32]
    exponent = mx_exponent(groups.abs().amax(-1), exponent_rule)  # [out, n_blocks]
    scaled = groups / torch.exp2(exponent.float())[..., None]  # exact: a power of two
    return encode(scaled, E2M1, ties).reshape(w.shape), exponent


def mxfp4_dequantize(codes: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """Back to float32: ``E2M1(code) * 2^X``."""
    values = decode(codes, E2M1).reshape(exponent.shape[0], exponent.shape[1], MX_BLOCK)
    return (values * torch.exp2(exponent.float())[..., None]).reshape(codes.shape)


def nvfp4_global_scale(w: torch.Tensor) -> torch.Tensor:
    """``G = 448 * 6 / amax``: maps the tensor's largest block scale, amax / 6, onto E4M3's largest value."""
    amax = w.float().abs().amax().clamp(min=torch.finfo(torch.float32).tiny)
    return (E4M3.max * E2M1.max) / amax


def nvfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4 codes ``[out, in]`` (uint8 E2M1), block scales ``[out, in / 16]`` (float32 on E4M3's grid) and ``G``."""
    groups = blocks(w, NV_BLOCK)  # [out, n_blocks, 16]
    g = nvfp4_global_scale(w)
    scale = round_to(g * (groups.abs().amax(-1) / E2M1.max), E4M3)  # [out, n_blocks], the block scale as stored
    scale = torch.where(scale == 0, 2.0**-3, scale)  # an all-zero block: any scale will do; compressed-tensors uses 1/8
    scaled = groups / (scale / g)[..., None]
    return encode(scaled, E2M1).reshape(w.shape), scale, g


def nvfp4_dequantize(codes: torch.Tensor, scale: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Back to float32: ``E2M1(code) * s / G``."""
    values = decode(codes, E2M1).reshape(scale.shape[0], scale.shape[1], NV_BLOCK)
    return (values * (scale / g)[..., None]).reshape(codes.shape)


def fake_quantize(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """Quantize and dequantize a weight in ``fmt`` ("mxfp4" or "nvfp4"), in its own dtype: what the model computes with."""
    if fmt == "mxfp4":
        restored = mxfp4_dequantize(*mxfp4_quantize(w))
    elif fmt == "nvfp4":
        restored = nvfp4_dequantize(*nvfp4_quantize(w))
    else:
        raise LessonError(f"format {fmt!r}: choose 'mxfp4' or 'nvfp4' (FP8 is in quantlesson.scratch.fp8).")
    return restored.to(w.dtype)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Two E2M1 codes per byte, the even column in the low nibble: ``[out, in]`` -> ``[out, in / 2]`` (compressed-tensors' layout)."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def gguf_mxfp4_bytes(codes: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """llama.cpp's MXFP4 block: 17 bytes per 32 weights, ``[out, n_blocks * 17]`` uint8.

    Byte 0 is the E8M0 exponent ``X + 127``; bytes 1-16 hold element j in the low nibble and element j + 16 in the
    high nibble. llama.cpp never writes negative zero (code 8), so it becomes 0.
    """
    codes = torch.where(codes == 8, 0, codes).reshape(exponent.shape[0], exponent.shape[1], MX_BLOCK)
    elements = codes[..., :16] | (codes[..., 16:] << 4)
    e8m0 = (exponent + E8M0_BIAS).to(torch.uint8)[..., None]
    return torch.cat([e8m0, elements], dim=-1).reshape(exponent.shape[0], -1)
