"""FP8 weights from scratch: E4M3 elements with one float32 scale per tensor, per output channel or per 128 x 128 block.

Hopper GPUs (H100, H200) multiply FP8 matrices natively. The weight is stored as ``q = E4M3(w / s)`` with

    s = amax / 448

where 448 is E4M3's largest value and ``amax`` is the largest ``|w|`` of the tensor, of the output channel (row)
or of the 128 x 128 block (DeepSeek-V3's layout, llm-compressor's ``FP8_BLOCK``). Unlike INT8 there is no
uniform grid: each value keeps about 3 significant bits wherever it lies, so a small weight next to an outlier
is not rounded to zero. That is why one scale per tensor is often enough for FP8 and never for INT4.

Shapes: a weight ``[out, in]`` gives codes ``[out, in]`` (uint8 E4M3 bit patterns) and scales ``[1, 1]``
(tensor), ``[out, 1]`` (channel) or ``[ceil(out / 128), ceil(in / 128)]`` (block).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quantlesson.errors import LessonError
from quantlesson.scratch.minifloat import E4M3, check_values, decode, encode

GRANULARITIES = ("tensor", "channel", "block")
BLOCK = 128


def padded(w: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Zero-pad a ``[out, in]`` weight so both sides are multiples of ``block``."""
    rows, cols = w.shape
    return F.pad(w, (0, -cols % block, 0, -rows % block))


def as_blocks(w: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """``[out, in]`` (padded) -> ``[out / block, in / block, block * block]``: one row of values per block."""
    p = padded(w, block)
    rows, cols = p.shape
    return p.reshape(rows // block, block, cols // block, block).transpose(1, 2).flatten(-2)


def amax(w: torch.Tensor, granularity: str) -> torch.Tensor:
    """The largest ``|w|`` per tensor ``[1, 1]``, per row ``[out, 1]`` or per block ``[out / 128, in / 128]``."""
    if granularity == "tensor":
        return w.abs().amax().reshape(1, 1)
    if granularity == "channel":
        return w.abs().amax(dim=1, keepdim=True)
    if granularity == "block":
        return as_blocks(w).abs().amax(-1)
    raise LessonError(f"granularity={granularity!r}: choose one of {GRANULARITIES}.")


def expand(scale: torch.Tensor, shape: torch.Size, granularity: str) -> torch.Tensor:
    """The scale of every weight: block scales repeat over their 128 x 128 weights; the others broadcast as they are."""
    if granularity != "block":
        return scale
    return scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[: shape[0], : shape[1]]


def quantize_weight(w: torch.Tensor, granularity: str = "channel") -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 codes ``[out, in]`` and float32 scales (``s = amax / 448``; an all-zero group gets float32's eps)."""
    if w.dim() != 2:
        raise LessonError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}: pass a linear layer's weight.")
    check_values(w)
    w = w.float()
    scale = amax(w, granularity) / E4M3.max
    scale = torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)
    return encode(w / expand(scale, w.shape, granularity), E4M3), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, granularity: str = "channel") -> torch.Tensor:
    """Back to float32: ``E4M3(code) * s``."""
    return decode(codes, E4M3) * expand(scale, codes.shape, granularity)


def fake_quantize(w: torch.Tensor, granularity: str = "channel") -> torch.Tensor:
    """Quantize and dequantize, in the weight's own dtype."""
    return dequantize(*quantize_weight(w, granularity), granularity).to(w.dtype)
