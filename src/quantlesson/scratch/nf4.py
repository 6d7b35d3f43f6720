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
with the first in the high nibble, the lookup table that rounds the 8-bit
constants) follow bitsandbytes, so the tests can compare this code with
``bitsandbytes.functional.quantize_4bit`` bit for bit.
"""

from __future__ import annotations

import torch

from quantlesson.errors import LessonError

OFFSET = 0.9677083  # the outermost quantile used (QLoRA's choice, as in bitsandbytes)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the block sizes bitsandbytes takes
ZERO_CODE = 7  # the code of the level 0.0


def nf4_levels(offset: float = OFFSET, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 NF4 levels: normal quantiles, 8 positive and 7 negative, plus an exact zero, scaled to [-1, 1]."""
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float32)[:-1].double())  # 8 quantiles
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float32)[:-1].double())  # 7 quantiles
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).float().sort().values
    return (levels / levels.max()).to(device)  # computed on the CPU (float64), then moved to the weights


def check_weight(w: torch.Tensor, blocksize: int) -> None:
    """Raise a clear :class:`LessonError` for a block size or weight tensor this code cannot use."""
    if blocksize not in BLOCKSIZES:
        raise LessonError(f"blocksize={blocksize}: use a power of two from 32 to 4096, as bitsandbytes does; QLoRA uses 64.")
    if not w.is_floating_point():
        raise LessonError(f"expected floating-point weights, got {w.dtype}: pass the real-valued weight, not codes.")
    if w.numel() == 0:
        raise LessonError(f"the weight of shape {tuple(w.shape)} is empty: there is nothing to quantize.")
    if not w.is_meta and not torch.isfinite(w).all():  # a meta tensor has no values to check
        raise LessonError("the weight holds NaN or infinite values, which would spoil their whole block: fix the model first.")


def absmax_blocks(w: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``w`` (flattened) into blocks; return blocks ``[n_blocks, blocksize]`` and their absmax ``[n_blocks]``."""
    check_weight(w, blocksize)
    flat = w.reshape(-1).float()
    if flat.numel() % blocksize:
        raise LessonError(f"{flat.numel()} weights do not split into blocks of {blocksize}: use a multiple of {blocksize}.")
    blocks = flat.reshape(-1, blocksize)
    return blocks, blocks.abs().amax(dim=1)


def quantize_nf4(w: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes 0..15 (uint8, one per weight) and the absmax of each block."""
    blocks, absmax = absmax_blocks(w, blocksize)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1)  # [n_blocks, blocksize] in [-1, 1]
    levels = nf4_levels(device=w.device)
    midpoints = (levels[:-1] + levels[1:]) / 2
    codes = torch.bucketize(scaled, midpoints)  # nearest level; a value on a midpoint goes down
    return codes.to(torch.uint8).reshape(-1), absmax


def dequantize_nf4(codes: torch.Tensor, absmax: torch.Tensor, shape: torch.Size, blocksize: int = 64) -> torch.Tensor:
    """Weights back from codes: ``level[code] * absmax`` of the block."""
    if codes.numel() != torch.Size(shape).numel() or codes.numel() != absmax.numel() * blocksize:
        raise LessonError(f"{codes.numel()} codes, {absmax.numel()} absmax values of blocks of {blocksize} and shape "
                          f"{tuple(shape)} do not match: pass the codes and absmax of one tensor and its shape.")  # fmt: skip
    values = nf4_levels(device=codes.device)[codes.long()].reshape(-1, blocksize) * absmax[:, None]
    return values.reshape(shape)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the first in the high nibble (bitsandbytes' order).

    An odd number of codes is padded with the code of 0.0, as bitsandbytes pads its values.
    """
    codes = codes.reshape(-1)
    if codes.numel() % 2:
        codes = torch.nn.functional.pad(codes, (0, 1), value=ZERO_CODE)
    return (codes[0::2] << 4) | codes[1::2]


def lookup_table(code: torch.Tensor, size: int = 65536) -> torch.Tensor:
    """bitsandbytes' CPU rounding table: for ``size`` evenly spaced points on [-1, 1], the index of the nearest code.

    ``code`` holds 256 values sorted from -1 to 1. Point ``i`` is ``-1 + 2i / (size - 1)``;
    its entry counts the midpoints between neighbouring codes that lie below it.
    """
    midpoints = 0.5 * (code[:-1] + code[1:])  # [255]
    grid = -1.0 + (2.0 * torch.arange(size, dtype=torch.float32, device=code.device)) / (size - 1)  # [size]
    return torch.searchsorted(midpoints, grid)  # [size], 0..255


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization with a 256-value code book, as bitsandbytes' CPU kernel does it.

    Each block is scaled by ``1 / absmax`` into [-1, 1]; the value is then snapped to the
    nearest of 65,536 grid points and the table gives that point's nearest code. So a value
    within one grid step (2/65535) of a midpoint between two codes may get the neighbouring code.
    """
    if code.numel() != 256 or blocksize < 1:
        raise LessonError(f"8-bit quantization needs a code book of 256 values (got {code.numel()}) and a positive "
                          f"blocksize (got {blocksize}): use bitsandbytes.functional.create_dynamic_map() and 256.")  # fmt: skip
    blocks, absmax = _padded_blocks(x, blocksize)  # a last, shorter block is zero-padded
    inverse = torch.where(absmax == 0, 0.0, 1.0 / absmax)  # [n_blocks]
    scaled = torch.clamp(blocks * inverse[:, None], -1, 1)  # [n_blocks, blocksize]
    grid_point = ((scaled + 1) * 0.5 * 65535 + 0.5).long()  # the nearest grid point, 0..65535, in float32 as in C
    codes = lookup_table(code.to(x.device, torch.float32))[grid_point]
    codes = torch.where(absmax[:, None] == 0, 0, codes)  # an all-zero block: code 0, as bitsandbytes writes
    return codes.to(torch.uint8).reshape(-1)[: x.numel()], absmax


def _padded_blocks(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    if x.numel() == 0:
        raise LessonError("there are no absmax constants to quantize: pass the absmax of a non-empty tensor.")
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
    values = torch.nn.functional.pad(code.to(codes.device)[codes.long()], (0, -n % blocksize)).reshape(-1, blocksize) * absmax2[:, None]
    return values.reshape(-1)[:n] + offset


def bits_per_weight(blocksize: int = 64, double_quant: bool = False, blocksize2: int = 256) -> float:
    """Storage per weight: 4 bits of code plus the constants' share (QLoRA's accounting)."""
    if not double_quant:
        return 4 + 32 / blocksize
    return 4 + 8 / blocksize + 32 / (blocksize * blocksize2)
