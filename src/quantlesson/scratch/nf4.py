"""NF4 (4-bit NormalFloat) with blockwise absmax and double quantization, from scratch.

From QLoRA (Dettmers, Pagnoni, Holtzman and Zettlemoyer, 2023, arXiv:2305.14314).
Trained weights are roughly normally distributed, so NF4 places its 16 levels
at quantiles of the standard normal distribution (scaled to [-1, 1]): each level
is used about equally often. Each block of 64 weights is divided by its absolute
maximum ("absmax") and every value is rounded to the nearest level.

Double quantization stores those absmax constants themselves in 8 bits (blocks
of 256, after subtracting their mean), taking their cost from 32/64 = 0.5 to
about 8/64 + 32/(64*256) = 0.127 bits per weight.

The conventions (level table, rounding at midpoints, packing two codes per byte
with the first in the high nibble) follow bitsandbytes, so the tests can compare
this code with ``bitsandbytes.functional.quantize_4bit`` bit for bit.
"""

from __future__ import annotations

import torch

from quantlesson.errors import LessonError

OFFSET = 0.9677083  # the outermost quantile used (QLoRA's choice, as in bitsandbytes)


def nf4_levels(offset: float = OFFSET) -> torch.Tensor:
    """The 16 NF4 levels: normal quantiles, 8 positive and 7 negative, plus an exact zero, scaled to [-1, 1]."""
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float32)[:-1].double())  # 8 quantiles
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float32)[:-1].double())  # 7 quantiles
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).float().sort().values
    return levels / levels.max()


def absmax_blocks(w: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``w`` (flattened) into blocks; return blocks ``[n_blocks, blocksize]`` and their absmax ``[n_blocks]``."""
    flat = w.reshape(-1).float()
    if flat.numel() % blocksize:
        raise LessonError(f"{flat.numel()} weights do not split into blocks of {blocksize}: use a multiple of {blocksize}.")
    blocks = flat.reshape(-1, blocksize)
    return blocks, blocks.abs().amax(dim=1)


def quantize_nf4(w: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes 0..15 (uint8, one per weight) and the absmax of each block."""
    blocks, absmax = absmax_blocks(w, blocksize)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1)  # [n_blocks, blocksize] in [-1, 1]
    levels = nf4_levels()
    midpoints = (levels[:-1] + levels[1:]) / 2
    codes = torch.bucketize(scaled, midpoints)  # nearest level; a value on a midpoint goes down
    return codes.to(torch.uint8).reshape(-1), absmax


def dequantize_nf4(codes: torch.Tensor, absmax: torch.Tensor, shape: torch.Size, blocksize: int = 64) -> torch.Tensor:
    """Weights back from codes: ``level[code] * absmax`` of the block."""
    values = nf4_levels()[codes.long()].reshape(-1, blocksize) * absmax[:, None]
    return values.reshape(shape)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the first in the high nibble (bitsandbytes' order)."""
    return (codes[0::2] << 4) | codes[1::2]


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization with a 256-value code book: each value to the nearest code after absmax scaling."""
    blocks, absmax = _padded_blocks(x, blocksize)  # a last, shorter block is zero-padded
    scaled = blocks / absmax[:, None]
    order = torch.argsort(code)
    sorted_code = code[order]
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    return order[torch.bucketize(scaled, midpoints)].to(torch.uint8).reshape(-1)[: x.numel()], absmax


def _padded_blocks(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.reshape(-1).float()
    padded = torch.nn.functional.pad(flat, (0, -flat.numel() % blocksize))
    blocks = padded.reshape(-1, blocksize)
    return blocks, blocks.abs().amax(dim=1)


def double_quantize(absmax: torch.Tensor, code: torch.Tensor, blocksize: int = 256):
    """Quantize the absmax constants: subtract their mean, then 8-bit blockwise. Returns (codes, absmax2, offset)."""
    offset = absmax.mean()
    codes, absmax2 = quantize_blockwise_8bit(absmax - offset, code, blocksize)
    return codes, absmax2, offset


def double_dequantize(codes: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor, code: torch.Tensor, blocksize: int = 256) -> torch.Tensor:
    """The absmax constants back from their 8-bit codes."""
    n = codes.numel()
    values = torch.nn.functional.pad(code[codes.long()], (0, -n % blocksize)).reshape(-1, blocksize) * absmax2[:, None]
    return values.reshape(-1)[:n] + offset


def bits_per_weight(blocksize: int = 64, double_quant: bool = False, blocksize2: int = 256) -> float:
    """Storage per weight: 4 bits of code plus the constants' share (QLoRA's accounting)."""
    if not double_quant:
        return 4 + 32 / blocksize
    return 4 + 8 / blocksize + 32 / (blocksize * blocksize2)
