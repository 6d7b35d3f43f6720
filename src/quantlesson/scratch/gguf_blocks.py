"""GGUF from scratch: llama.cpp's Q8_0 and Q4_0 blocks, and the file that holds them.

llama.cpp quantizes weights in *blocks* of 32 consecutive values along a row,
each with its own scale stored as a 16-bit float:

* **Q8_0**: ``d = max|x| / 127``, codes ``q = round(x / d)`` in -127..127;
  32 bytes of codes + 2 bytes of scale = 34 bytes per 32 weights = **8.5 bits per weight**.
* **Q4_0**: ``d = m / -8`` where ``m`` is the block's value of largest magnitude
  (with its sign), codes ``q = trunc(x / d + 8.5)`` clamped to 0..15, stored
  two per byte; 16 + 2 = 18 bytes per 32 weights = **4.5 bits per weight**.
  Dequantized: ``(q - 8) * d``; ``m`` itself lands exactly on code 0 (-8 d).

The arithmetic follows ggml's reference C code (multiply by ``1/d`` in float32,
round half away from zero), so the tests can require *identical bytes* to the
``gguf`` package's quantizer, which is bit-exact with llama.cpp.

A GGUF file (version 3) is: the magic ``GGUF``, a version, the number of tensors
and of metadata entries; the metadata as typed key-value pairs; one record per
tensor (name, shape, type, offset); then, aligned to 32 bytes, the tensor data.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import torch

from quantlesson.errors import LessonError

BLOCK = 32  # weights per block in Q8_0 and Q4_0
ALIGNMENT = 32  # GGUF's default data alignment
TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 8}  # ggml type ids (ggml.h: enum ggml_type)


def as_array(x) -> np.ndarray:
    """A NumPy array from an array or a torch tensor on any device (bfloat16, which NumPy lacks, as float32)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    return np.asarray(x)


def blocks_of(x) -> np.ndarray:
    """View a float tensor as rows of 32-value blocks: ``[..., n] -> [n_blocks, 32]`` (float32)."""
    x = as_array(x).astype(np.float32, copy=False)
    if x.ndim == 0 or x.shape[-1] % BLOCK:
        raise LessonError(f"Q8_0 and Q4_0 need rows that are a multiple of {BLOCK} values, not shape {x.shape}: "
                          "keep such tensors in F16 or F32.")  # fmt: skip
    if not np.isfinite(x).all():
        raise LessonError("the tensor holds NaN or infinite values, which would spoil their block's scale: fix them first.")
    return x.reshape(-1, BLOCK)


def round_half_away(x: np.ndarray) -> np.ndarray:
    """C's ``roundf``: halves round away from zero (NumPy's ``round`` rounds them to even).

    The whole part plus 1 where the fraction is at least 0.5: both steps are exact in float32,
    while ``floor(|x| + 0.5)`` is not (0.49999997 + 0.5 rounds up to 1.0, and so would the code).
    """
    a = np.abs(x)
    whole = np.floor(a)
    return np.sign(x) * (whole + (a - whole >= np.float32(0.5)))


def inverse(d: np.ndarray) -> np.ndarray:
    """``1 / d``, and 0 where ``d`` is 0 (an all-zero block)."""
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """Q8_0 blocks: ``[..., n]`` floats -> ``[n_blocks, 34]`` bytes (fp16 scale, then 32 int8 codes)."""
    blocks = blocks_of(x)  # [n_blocks, 32]
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)  # [n_blocks, 1]
    q = round_half_away(blocks * inverse(d)).astype(np.int8)  # [n_blocks, 32], -127..127
    return np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1)


def check_bytes(data: np.ndarray, kind: str, size: int) -> None:
    """Raise a clear :class:`LessonError` unless ``data`` holds blocks of ``size`` bytes."""
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != size:
        raise LessonError(f"{kind} data must be [n_blocks, {size}] bytes (uint8), got {data.dtype} {data.shape}: "
                          f"pass what quantize_{kind.lower()} returned.")  # fmt: skip


def dequantize_q8_0(data: np.ndarray) -> np.ndarray:
    """``[n_blocks, 34]`` bytes -> ``[n_blocks, 32]`` floats: ``q * d``."""
    check_bytes(data, "Q8_0", 34)
    d = data[:, :2].copy().view(np.float16).astype(np.float32)  # [n_blocks, 1]
    return data[:, 2:].view(np.int8).astype(np.float32) * d


def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    """Q4_0 blocks: ``[..., n]`` floats -> ``[n_blocks, 18]`` bytes (fp16 scale, then 16 bytes of 4-bit codes)."""
    blocks = blocks_of(x)  # [n_blocks, 32]
    m = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None], axis=1)  # signed value of largest magnitude
    d = m / np.float32(-8)  # [n_blocks, 1]: m maps to code 0, i.e. -8 after the offset
    q = np.trunc(blocks * inverse(d) + np.float32(8.5)).astype(np.uint8).clip(0, 15)  # [n_blocks, 32], 0..15
    packed = q[:, :16] | (q[:, 16:] << np.uint8(4))  # byte j holds values j (low nibble) and j + 16 (high)
    return np.concatenate([d.astype(np.float16).view(np.uint8), packed], axis=1)


def dequantize_q4_0(data: np.ndarray) -> np.ndarray:
    """``[n_blocks, 18]`` bytes -> ``[n_blocks, 32]`` floats: ``(q - 8) * d``."""
    check_bytes(data, "Q4_0", 18)
    d = data[:, :2].copy().view(np.float16).astype(np.float32)  # [n_blocks, 1]
    packed = data[:, 2:]  # [n_blocks, 16]
    q = np.concatenate([packed & np.uint8(0x0F), packed >> np.uint8(4)], axis=1).astype(np.int8) - 8
    return q.astype(np.float32) * d


def bits_per_weight(type_size_bytes: int, block_size: int) -> float:
    """Bits per weight of a block format: 34 bytes per 32 weights -> 8.5."""
    return 8 * type_size_bytes / block_size


# --- the file -------------------------------------------------------------------------------

_VALUE_TYPES = {int: (4, "<I"), float: (6, "<f"), bool: (7, "<?"), str: (8, None)}  # uint32, float32, bool, string
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _value(value) -> bytes:
    """A typed metadata value: uint32 type id, then the value (strings: uint64 length + UTF-8)."""
    kind = type(value)
    if kind not in _VALUE_TYPES:
        raise LessonError(f"This writer stores int, float, bool and str metadata, not {kind.__name__}.")
    if kind is int and not 0 <= value < 2**32:
        raise LessonError(f"{value} does not fit GGUF's uint32 (0 to 4294967295), the type this writer stores ints as: store it as a str.")
    if kind is float and math.isfinite(value) and abs(value) > _FLOAT32_MAX:
        raise LessonError(f"{value} does not fit GGUF's float32 (up to about 3.4e38), the type this writer stores floats as.")
    type_id, fmt = _VALUE_TYPES[kind]
    return struct.pack("<I", type_id) + (_string(value) if kind is str else struct.pack(fmt, value))


def _pad(n: int) -> int:
    return (ALIGNMENT - n % ALIGNMENT) % ALIGNMENT


def tensor_bytes(array: np.ndarray, kind: str) -> bytes:
    """A tensor's data in one of the types this writer knows: F32, F16, Q8_0, Q4_0."""
    if kind == "F32":
        return np.ascontiguousarray(as_array(array), dtype=np.float32).tobytes()
    if kind == "F16":
        return np.ascontiguousarray(as_array(array), dtype=np.float16).tobytes()
    if kind == "Q8_0":
        return quantize_q8_0(array).tobytes()
    if kind == "Q4_0":
        return quantize_q4_0(array).tobytes()
    raise LessonError(f"Unknown tensor type {kind!r}: this writer knows {sorted(TYPES)}.")


def check_contents(metadata: dict, tensors: dict) -> None:
    """Raise a clear :class:`LessonError` for metadata keys or tensor entries the writer cannot store."""
    for key in [*metadata, *tensors]:
        if not isinstance(key, str):
            raise LessonError(f"GGUF keys and tensor names are strings, not {key!r}: name it like 'general.name'.")
    for name, entry in tensors.items():
        if not (isinstance(entry, tuple) and len(entry) == 2):
            raise LessonError(f"tensor {name!r}: give each tensor as (array, type), e.g. (w, 'Q8_0').")


def write_gguf(path: str | Path, metadata: dict, tensors: dict[str, tuple[np.ndarray, str]]) -> Path:
    """Write a GGUF (version 3) file: ``metadata`` {key: int | float | bool | str}, ``tensors`` {name: (array, type)}.

    Written to a temporary name and renamed at the end, so a failure leaves no half-written file.
    """
    path = Path(path)
    check_contents(metadata, tensors)
    data = {name: tensor_bytes(array, kind) for name, (array, kind) in tensors.items()}  # fail before writing
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    header += b"".join(_string(key) + _value(value) for key, value in metadata.items())
    offset = 0
    for name, (array, kind) in tensors.items():
        shape = tuple(reversed(array.shape))  # GGUF lists dimensions innermost first
        header += _string(name) + struct.pack(f"<I{len(shape)}QIQ", len(shape), *shape, TYPES[kind], offset)
        offset += len(data[name]) + _pad(len(data[name]))
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as f:
            f.write(header + bytes(_pad(len(header))))
            for raw in data.values():
                f.write(raw + bytes(_pad(len(raw))))
        partial.replace(path)
    except BaseException:  # an error, or Ctrl-C: remove the half-written file, then let it go on
        partial.unlink(missing_ok=True)
        raise
    return path
