"""A fast 4-bit kernel path on NVIDIA GPUs: PyTorch's own int4 "tinygemm" matrix multiply.

``torch.ops.aten._weight_int4pack_mm`` multiplies bfloat16 activations by 4-bit
weights packed in a tiled layout, dequantizing inside the kernel (the path
PyTorch's gpt-fast uses). Each group of ``group_size`` input columns of a row
has a bfloat16 scale and offset: ``w = (q - 8) * scale + offset`` with ``q`` in 0..15.

Symmetric codes from :mod:`quantlesson.scratch.rtn` or :mod:`quantlesson.scratch.gptq`
(``w = q * scale``, ``q`` in -8..7) map onto it exactly: ``q + 8`` and offset 0.
So a GPTQ checkpoint runs on this kernel unchanged in quality.
"""

from __future__ import annotations

import torch

from quantlesson.errors import LessonError
from quantlesson.models import require_capability
from quantlesson.scratch import rtn

GROUP_SIZES = (32, 64, 128, 256)


def pack_int4_tiles(codes: torch.Tensor, inner_k_tiles: int = 8) -> torch.Tensor:
    """Codes ``[out, in]`` in -8..7 -> the kernel's tiled layout (two codes per byte, high nibble first)."""
    unsigned = (codes.to(torch.int32) + 8).to(torch.uint8)  # 0..15
    paired = (unsigned[:, ::2] << 4) | unsigned[:, 1::2]  # [out, in/2]
    return torch.ops.aten._convert_weight_to_int4pack(paired.contiguous(), inner_k_tiles)


class Int4PackLinear(torch.nn.Module):
    """A linear layer stored as 4-bit codes and computed by PyTorch's int4 CUDA kernel."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, group_size: int, bias: torch.Tensor | None = None):
        super().__init__()
        require_capability("PyTorch's int4 kernel (_weight_int4pack_mm)", 8, 0)
        out_features, in_features = codes.shape
        if group_size not in GROUP_SIZES or in_features % group_size:
            raise LessonError(f"The int4 kernel takes group sizes {GROUP_SIZES} dividing the input width ({in_features}).")
        if in_features % (16 * 8):
            raise LessonError(f"The int4 kernel's tiles need an input width divisible by 128 (got {in_features}).")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        device = torch.device("cuda")
        self.register_buffer("packed", pack_int4_tiles(codes.to(device)))
        offsets = torch.zeros_like(scale)
        # [n_groups, out, 2]: (scale, offset) per group and row, as the kernel reads them
        self.register_buffer("scales_and_zeros", torch.stack([scale, offsets], dim=-1).transpose(0, 1).contiguous().to(device, torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.detach().to(device, torch.bfloat16))

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, group_size: int = 128) -> "Int4PackLinear":
        """Round-to-nearest symmetric 4-bit codes of ``linear``, packed for the kernel."""
        codes, scale, _ = rtn.quantize_weight(linear.weight.detach().float(), 4, group_size, symmetric=True)
        return cls(codes, scale, group_size, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1] + (self.out_features,)
        y = torch.ops.aten._weight_int4pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16), self.packed, self.group_size, self.scales_and_zeros)
        y = y.reshape(shape)
        return y if self.bias is None else y + self.bias


def quantize_to_int4pack(model: torch.nn.Module, group_size: int = 128, skip: tuple[str, ...] = ("lm_head",)) -> torch.nn.Module:
    """Replace every linear layer but ``skip`` with an :class:`Int4PackLinear` (round-to-nearest), in place."""
    require_capability("PyTorch's int4 kernel (_weight_int4pack_mm)", 8, 0)
    for name, linear in rtn.linear_layers(model, skip).items():
        rtn.replace_module(model, name, Int4PackLinear.from_linear(linear, group_size))
    return model
