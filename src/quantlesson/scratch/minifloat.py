"""Small floating-point formats from scratch: FP8 (E4M3, E5M2) and FP4 (E2M1).

A *minifloat* element is a sign bit, ``E`` exponent bits and ``M`` mantissa bits. A normal number is
``(-1)^s * 2^(e - bias) * (1 + m / 2^M)``; exponent field 0 holds the subnormals ``2^(1 - bias) * m / 2^M``,
evenly spaced down to zero. So the grid is fine near zero and coarse far from it: every binade
``[2^k, 2^(k+1))`` holds the same ``2^M`` values.

=========  ====  ====  ======  ==========  ===================================================
format     E     M     bias    largest     specials
=========  ====  ====  ======  ==========  ===================================================
E4M3       4     3     7       448         no infinities; S.1111.111 is NaN (``float8_e4m3fn``)
E5M2       5     2     15      57344       infinities and NaNs, as IEEE (``float8_e5m2``)
E2M1       2     1     1       6           none: the 16 codes are 0, 0.5, 1, 1.5, 2, 3, 4, 6 and negatives
=========  ====  ====  ======  ==========  ===================================================

:func:`round_to` rounds real numbers onto a format's grid: to the nearest value, ties to the even code
(IEEE's default), and **saturating**: anything beyond the largest value becomes the largest value. That is
what quantizers want (an outlier keeps its sign and stays large). PyTorch 2.13's cast to
``float8_e4m3fn`` saturates too, but its cast to ``float8_e5m2`` overflows to infinity, and older
versions gave NaN: libraries clamp before they cast. :func:`encode` gives the bit patterns,
:func:`decode` reads them back.

``ties="toward-zero"`` breaks a tie toward the smaller magnitude instead of the even code: that is what
llama.cpp's Python MXFP4 quantizer does (it takes the first of two equally near values).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantlesson.errors import LessonError


@dataclass(frozen=True)
class Minifloat:
    """An element format: exponent and mantissa bits, exponent bias and largest finite value."""

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    max: float

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def min_exponent(self) -> int:
        """The exponent of the smallest normal number; subnormals share its step."""
        return 1 - self.bias


E4M3 = Minifloat("E4M3", exponent_bits=4, mantissa_bits=3, bias=7, max=448.0)
E5M2 = Minifloat("E5M2", exponent_bits=5, mantissa_bits=2, bias=15, max=57344.0)
E2M1 = Minifloat("E2M1", exponent_bits=2, mantissa_bits=1, bias=1, max=6.0)
FORMATS = {f.name: f for f in (E4M3, E5M2, E2M1)}


def check_values(x: torch.Tensor) -> None:
    """Raise a clear error for input a quantizer cannot take."""
    if not x.is_floating_point():
        raise LessonError(f"expected real numbers, got {x.dtype}: pass the weight itself, not codes.")
    if not torch.isfinite(x).all():
        raise LessonError("the tensor holds NaN or infinite values: a scale computed from them is meaningless; fix the model first.")


def exponent_of(magnitude: torch.Tensor, fmt: Minifloat) -> torch.Tensor:
    """The binade of each value, ``floor(log2 |x|)``, never below the smallest normal exponent (exact, via frexp)."""
    _, e = torch.frexp(magnitude)  # magnitude = f * 2^e with f in [0.5, 1)
    return (e - 1).clamp(min=fmt.min_exponent)


TIES = ("even", "toward-zero")


def round_to(x: torch.Tensor, fmt: Minifloat, ties: str = "even") -> torch.Tensor:
    """Round to the nearest value of ``fmt``, saturating at ``±fmt.max``. Float32 in, float32 out.

    ``ties="even"``: a value halfway between two grid points goes to the one with the even code (IEEE);
    ``ties="toward-zero"``: to the smaller magnitude.
    """
    if ties not in TIES:
        raise LessonError(f"ties={ties!r}: choose one of {TIES}.")
    x = x.float()
    magnitude = x.abs().clamp(max=fmt.max)
    step = torch.exp2((exponent_of(magnitude, fmt) - fmt.mantissa_bits).float())  # the spacing of the grid there
    steps = magnitude / step  # exact: step is a power of two
    # torch.round rounds half to even; ceil(s - 1/2) rounds half down. A carry lands on 2^(k+1), which is on the grid.
    rounded = (torch.round(steps) if ties == "even" else torch.ceil(steps - 0.5)) * step
    return torch.copysign(rounded.clamp(max=fmt.max), x)


def encode(x: torch.Tensor, fmt: Minifloat, ties: str = "even") -> torch.Tensor:
    """The bit pattern of each value after :func:`round_to`: sign | exponent field | mantissa field, as uint8."""
    check_values(x)
    value = round_to(x, fmt, ties)
    magnitude = value.abs()
    exponent = exponent_of(magnitude, fmt)
    subnormal = magnitude < 2.0**fmt.min_exponent
    exponent_field = torch.where(subnormal, 0, exponent + fmt.bias)
    significand = magnitude / torch.exp2(exponent.float()) * 2**fmt.mantissa_bits  # 1.m * 2^M, or 0.m * 2^M
    mantissa_field = significand.to(torch.int32) - torch.where(subnormal, 0, 2**fmt.mantissa_bits)
    sign = torch.signbit(value).to(torch.int32)
    code = (sign << (fmt.exponent_bits + fmt.mantissa_bits)) | (exponent_field << fmt.mantissa_bits) | mantissa_field
    return code.to(torch.uint8)


def decode(code: torch.Tensor, fmt: Minifloat) -> torch.Tensor:
    """The float32 value of each bit pattern (specials such as E4M3's NaN are not produced by :func:`encode`)."""
    code = code.to(torch.int32)
    mantissa = code & (2**fmt.mantissa_bits - 1)
    exponent_field = (code >> fmt.mantissa_bits) & (2**fmt.exponent_bits - 1)
    sign = torch.where((code >> (fmt.exponent_bits + fmt.mantissa_bits)) & 1 == 1, -1.0, 1.0)
    subnormal = exponent_field == 0
    significand = torch.where(subnormal, 0, 2**fmt.mantissa_bits) + mantissa  # 1.m or 0.m, times 2^M
    exponent = torch.where(subnormal, fmt.min_exponent, exponent_field - fmt.bias)
    return sign * significand.float() * torch.exp2((exponent - fmt.mantissa_bits).float())


def grid(fmt: Minifloat) -> torch.Tensor:
    """Every non-negative finite value of the format, ascending (8 for E2M1, 127 for E4M3)."""
    codes = torch.arange(2 ** (fmt.bits - 1))
    values = decode(codes, fmt)
    return values[values <= fmt.max]
