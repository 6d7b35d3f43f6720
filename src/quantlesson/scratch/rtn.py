"""Round-to-nearest (RTN) quantization from scratch: absmax and zero-point, per tensor, channel or group.

Conventions follow compressed-tensors (the format of llm-compressor and vLLM),
so the lesson can check this code against it code for code:

* codes are signed integers in ``[-2**(bits-1), 2**(bits-1) - 1]`` (-8..7 for 4 bits);
* **absmax (symmetric)**: ``scale = max|w| / (levels / 2)`` with ``levels = 2**bits - 1``
  (7.5 for 4 bits, 127.5 for 8 bits), zero-point 0;
* **zero-point (asymmetric)**: ``scale = (max - min) / levels``,
  ``zero = round(qmin - min / scale)``; the range always includes 0, so 0.0 stays exact;
* ``w ≈ (q - zero) * scale``.

A *group* is ``group_size`` consecutive input columns of one output row
sharing a scale (and zero); ``group_size=None`` gives one group per row
(per channel); :func:`fake_quantize` with ``per_tensor=True`` one for the whole tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quantlesson.errors import LessonError

BITS = range(2, 9)


def check(bits: int, group_size: int | None, in_features: int) -> None:
    """Raise a clear :class:`LessonError` for a bit width or group size this code cannot use."""
    if bits not in BITS:
        raise LessonError(f"bits={bits} is not supported: round-to-nearest here takes 2 to 8 bits.")
    if group_size is not None and group_size < 1:
        raise LessonError(f"group_size={group_size}: a group is a positive number of columns, such as 32, 64 or 128 (None: one group per row).")
    if group_size is not None and in_features % group_size:
        raise LessonError(
            f"group_size={group_size} does not divide the layer's {in_features} input columns: "
            "use a divisor such as 32, 64 or 128, or None for one group per row."
        )


def check_weight(w: torch.Tensor, clip: float = 1.0) -> None:
    """Raise a clear :class:`LessonError` for a tensor that is not a real-valued ``[out, in]`` weight."""
    if w.dim() != 2:
        raise LessonError(
            f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}: pass a linear layer's weight, "
            "reshape it with w.reshape(w.shape[0], -1), or use fake_quantize(w, per_tensor=True) for any shape."
        )
    if not w.is_floating_point():
        raise LessonError(f"expected a floating-point weight, got {w.dtype}: pass the real-valued weight, not codes.")
    if w.numel() == 0:
        raise LessonError(f"the weight of shape {tuple(w.shape)} is empty: there is nothing to quantize.")
    if not w.is_meta and not torch.isfinite(w).all():  # a meta tensor has no values to check
        raise LessonError("the weight holds NaN or infinite values, which would spoil their whole group: fix the model first.")
    if not 0 < clip <= 1:
        raise LessonError(f"clip={clip}: the fraction of each group's range to keep must be in (0, 1]; 1 keeps it all.")


def qrange(bits: int) -> tuple[int, int]:
    """Smallest and largest code: (-8, 7) for 4 bits."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def scale_zero(w_min: torch.Tensor, w_max: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point from the minimum and maximum of each group."""
    qmin, qmax = qrange(bits)
    levels = torch.tensor(qmax - qmin, dtype=w_min.dtype, device=w_min.device)  # 15 for 4 bits
    # (a tensor, not a Python number: a GPU divides by a number as a multiplication by its rounded reciprocal)
    w_min = torch.minimum(w_min, torch.zeros_like(w_min))  # 0.0 must be representable
    w_max = torch.maximum(w_max, torch.zeros_like(w_max))
    if symmetric:
        scale = torch.maximum(w_min.abs(), w_max) / (levels / 2)
        zero = torch.zeros_like(scale)
    else:
        scale = (w_max - w_min) / levels
        zero = torch.clamp(qmin - w_min / scale, qmin, qmax)
        zero = torch.where(scale == 0, 0.0, zero)  # an all-zero group: 0/0; zero-point 0, as compressed-tensors gives
    scale = torch.where(scale == 0, torch.finfo(scale.dtype).eps, scale)
    return scale, torch.round(zero)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes: ``clamp(round(w / scale + zero), qmin, qmax)`` (as int8)."""
    qmin, qmax = qrange(bits)
    return torch.clamp(torch.round(w / scale + zero), qmin, qmax).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Back to real numbers: ``(q - zero) * scale``."""
    return (q.to(scale.dtype) - zero) * scale


def grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """View a ``[out, in]`` weight as ``[out, n_groups, group_size]``."""
    out_features, in_features = w.shape
    size = in_features if group_size is None else group_size
    return w.reshape(out_features, in_features // size, size)


def quantize_weight(w: torch.Tensor, bits: int = 4, group_size: int | None = None, symmetric: bool = True, clip: float = 1.0):
    """Quantize a ``[out, in]`` weight. Returns codes ``[out, in]`` and scale, zero ``[out, n_groups]``.

    ``clip < 1`` shrinks each group's range before the scale is computed (clipping):
    the extreme weights saturate, the rest get a finer step.
    """
    check_weight(w, clip)
    check(bits, group_size, w.shape[1])
    groups = grouped(w.float(), group_size)  # [out, n_groups, g]
    scale, zero = scale_zero(clip * groups.amin(-1), clip * groups.amax(-1), bits, symmetric)  # [out, n_groups]
    q = quantize(groups, scale[..., None], zero[..., None], bits)  # [out, n_groups, g]
    return q.reshape(w.shape), scale, zero


def fake_quantize(
    w: torch.Tensor, bits: int = 4, group_size: int | None = None, symmetric: bool = True,
    per_tensor: bool = False, clip: float = 1.0,
) -> torch.Tensor:  # fmt: skip
    """Quantize and dequantize in one go: the weight the quantized model really computes with."""
    if per_tensor:
        flat = w.reshape(1, -1)
        return fake_quantize(flat, bits, None, symmetric, clip=clip).reshape(w.shape)
    q, scale, zero = quantize_weight(w, bits, group_size, symmetric, clip)
    restored = dequantize(grouped(q, group_size), scale[..., None], zero[..., None])
    return restored.reshape(w.shape).to(w.dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte: ``[..., n]`` int8 in -8..7 -> ``[..., n/2]`` uint8 (low nibble first)."""
    if q.shape[-1] % 2:
        raise LessonError("pack_int4 needs an even number of codes in the last dimension.")
    nibbles = (q.to(torch.int16) + 8).to(torch.uint8)  # offset binary: -8..7 -> 0..15
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`."""
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack([low, high], dim=-1).flatten(-2)


class QuantLinear(torch.nn.Module):
    """A drop-in replacement for ``nn.Linear`` that stores integer codes and dequantizes on the fly.

    Codes of 4 bits or fewer are packed two per byte (so 3-bit codes take a
    4-bit slot: real formats pack tighter); wider codes take one byte each.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None, symmetric: bool, bias: bool):
        super().__init__()
        check(bits, group_size, in_features)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        n_groups = 1 if group_size is None else in_features // group_size
        code_columns = in_features // 2 if bits <= 4 else in_features
        self.register_buffer("codes", torch.zeros(out_features, code_columns, dtype=torch.uint8 if bits <= 4 else torch.int8))
        self.register_buffer("scale", torch.ones(out_features, n_groups))
        self.register_buffer("zero", None if symmetric else torch.zeros(out_features, n_groups, dtype=torch.int8))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, bits: int = 4, group_size: int | None = None, symmetric: bool = True, clip: float = 1.0):
        """Quantize an ``nn.Linear`` with round-to-nearest."""
        layer = cls(linear.in_features, linear.out_features, bits, group_size, symmetric, linear.bias is not None)
        q, scale, zero = quantize_weight(linear.weight.detach(), bits, group_size, symmetric, clip)
        layer.set_codes(q, scale, zero, linear.bias)
        return layer.to(linear.weight.device)

    def set_codes(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Store codes ``[out, in]`` (int8) with their scale and zero ``[out, n_groups]``."""
        self.codes = pack_int4(q) if self.bits <= 4 else q.to(torch.int8)
        self.scale = scale.float()
        if not self.symmetric:
            self.zero = zero.to(torch.int8)
        if bias is not None:
            self.bias = bias.detach().float().clone()

    def weight_codes(self) -> torch.Tensor:
        """The codes as an int8 ``[out, in]`` matrix."""
        return unpack_int4(self.codes) if self.bits <= 4 else self.codes

    def dequantized_weight(self) -> torch.Tensor:
        """The real-valued ``[out, in]`` weight the layer computes with."""
        zero = self.zero.float() if self.zero is not None else torch.zeros_like(self.scale)
        w = dequantize(grouped(self.weight_codes(), self.group_size), self.scale[..., None], zero[..., None])
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        grouping = "per channel" if self.group_size is None else f"group {self.group_size}"
        kind = "symmetric" if self.symmetric else "asymmetric"
        return f"in={self.in_features}, out={self.out_features}, {self.bits} bits, {grouping}, {kind}"


def fitting_group_size(model: torch.nn.Module, preferred: int = 128, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """``preferred`` if it divides every linear layer's input width, else the largest power of two below it that does.

    SmolLM2-135M's hidden size is 576 = 4.5 x 128, so groups of 128 do not fit it; 64 does.
    """
    widths = {layer.in_features for layer in linear_layers(model, skip).values()}
    size = preferred
    while size > 1 and any(width % size for width in widths):
        size //= 2
    if size != preferred:
        print(f"Groups of {preferred} do not divide every layer's input width {sorted(widths)}: using groups of {size}.")
    return size


def linear_layers(model: torch.nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> dict[str, torch.nn.Linear]:
    """The model's ``nn.Linear`` layers by name, without those whose name ends with one in ``skip``."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith(skip)
    }


def replace_module(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` was."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_model(model: torch.nn.Module, bits: int = 4, group_size: int | None = None, symmetric: bool = True, skip: tuple[str, ...] = ("lm_head",)) -> torch.nn.Module:
    """Replace every linear layer (but ``skip``) by a round-to-nearest :class:`QuantLinear`, in place."""
    layers = linear_layers(model, skip)
    for name, linear in layers.items():  # check every layer first: fail before changing anything
        check(bits, group_size, linear.in_features)
    for name, linear in layers.items():
        replace_module(model, name, QuantLinear.from_linear(linear, bits, group_size, symmetric))
    return model
