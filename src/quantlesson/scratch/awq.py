"""AWQ from scratch: activation-aware weight quantization (Lin et al., 2023, arXiv:2306.00978).

A few input channels of each linear layer carry much larger activations than
the rest; their weights matter most. AWQ protects them without mixed precision:
it multiplies those weight columns by a scale ``s > 1`` before quantizing (so
their rounding error shrinks relative to their size) and divides the
activations by ``s``, folded into the layer that produces them (a norm or a
linear layer), so the full-precision model computes exactly the same thing:

    y = W x = (W diag(s)) (diag(s)^-1 x)

The scale per channel is ``s = x_mean ** alpha`` (``duo`` scaling also divides
by ``w_mean ** (1 - alpha)``), and ``alpha`` is chosen by a grid search that
minimises the error of the block's output, one *mapping* (producer -> the
layers it feeds) at a time. No gradients and no weight updates: AWQ only
chooses scales, so it fits the calibration text less than GPTQ can.

Conventions follow llm-compressor's ``AWQModifier`` (0.14: its grid, scale
normalisation, loss and dtypes), so the tests can check this code against it:
``w_mean`` is normalised in the weight's dtype and summed in float64, ``x_mean`` is
float32, so duo scales are float64 and plain ones float32; each candidate is
quantized in the weight's dtype (bfloat16 for a bfloat16 model), as
compressed-tensors quantizes it. Candidates whose error is not finite are
skipped, and a mapping with none left raises a :class:`LessonError` (llm-compressor
raises too). Everything stays on the devices of the layers it belongs to.
Quantizer: :mod:`quantlesson.scratch.rtn`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import math

import torch

from quantlesson.errors import LessonError
from quantlesson.models import decoder_layers
from quantlesson.scratch import rtn
from quantlesson.scratch.gptq import first_layer_inputs, next_layer_inputs


@dataclass(frozen=True)
class Mapping:
    """One producer and the linear layers that read its output (names relative to a decoder layer).

    ``parent`` is the smallest module containing every balance layer: the search keeps its output close.
    """

    smooth: str
    balance: tuple[str, ...]
    parent: str


LLAMA = (
    Mapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    Mapping("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),  # only without grouped KV heads
    Mapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    Mapping("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)
OPT = (  # another family's names, as llm-compressor maps OPT: pass mappings=awq.OPT
    Mapping("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    Mapping("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"),
    Mapping("final_layer_norm", ("fc1",), "fc1"),
)


def mappings_for(block: torch.nn.Module, mappings: tuple[Mapping, ...] = LLAMA) -> tuple[Mapping, ...]:
    """The mappings that apply to this decoder layer; a clear error when its modules have other names."""
    names = dict(block.named_modules())
    missing = sorted({n for m in mappings for n in (m.smooth, m.parent, *m.balance) if n not in names})
    if missing:
        raise LessonError(
            f"{type(block).__name__} has no modules called {missing}: these AWQ mappings are for Llama-style "
            "layers. Pass your own, e.g. mappings=(awq.Mapping('norm1', ('attn.qkv',), 'attn'), ...): each "
            "names the module producing an activation, the linear layers reading it, and their parent."
        )

    def fits(m: Mapping) -> bool:  # v_proj -> o_proj only when v_proj's outputs are o_proj's inputs (no GQA)
        smooth = names[m.smooth]
        return not isinstance(smooth, torch.nn.Linear) or all(names[b].in_features == smooth.out_features for b in m.balance)

    return tuple(m for m in mappings if fits(m))


def mean_abs_input(x: torch.Tensor) -> torch.Tensor:
    """``x_mean``: the mean magnitude of each input channel over all tokens. ``[..., in] -> [in]``"""
    return x.abs().reshape(-1, x.shape[-1]).float().mean(0)


def mean_normalised_weight(weights: list[torch.Tensor], group_size: int | None) -> torch.Tensor:
    """``w_mean``: each weight's magnitude relative to its group's largest, averaged per input column. ``-> [in]``

    As llm-compressor: normalised in the weight's dtype, summed and averaged in float64.
    """
    total = 0
    for w in weights:  # [out, in]
        groups = rtn.grouped(w.abs(), group_size)  # [out, n_groups, g]
        normalised = (groups / (groups.amax(-1, keepdim=True) + 1e-6)).reshape(w.shape)
        total = total + normalised.sum(0, dtype=torch.float64)
    return total / sum(w.shape[0] for w in weights)


def scales_for(alpha: float, x_mean: torch.Tensor, w_mean: torch.Tensor | None = None) -> torch.Tensor:
    """``s = x_mean^alpha`` (or ``x_mean^alpha / w_mean^(1-alpha)``), normalised so ``max(s) * min(s) = 1``. ``[in]``"""
    if w_mean is None:
        s = x_mean.pow(alpha).clamp(min=1e-4)
    else:
        s = (x_mean.pow(alpha) / (w_mean.to(x_mean.device).pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.nan_to_num(s, nan=1.0, posinf=1.0)


def grid(n_grid: int = 20, duo: bool = True) -> list[tuple[float, bool]]:
    """The ``(alpha, duo)`` candidates: alpha from 0 to 1; with ``duo``, plain ``alpha = 0`` (no scaling) comes first."""
    if n_grid < 3:
        raise LessonError(f"n_grid={n_grid} is too coarse: use at least 3 grid points (llm-compressor's default is 20).")
    if duo:
        return [(0.0, False)] + [(i / (n_grid - 2), True) for i in range(n_grid - 1)]
    return [(i / (n_grid - 1), False) for i in range(n_grid)]


def quantize_scaled(w: torch.Tensor, s: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> torch.Tensor:
    """``Q(W diag(s)) diag(s)^-1``: the weight the scaled, quantized layer computes with. ``[out, in]``

    Scaled, quantized and dequantized in the weight's dtype, as llm-compressor does it.
    """
    s = s.to(w.device)
    scaled = rtn.grouped((w * s).to(w.dtype), group_size)  # [out, n_groups, g]
    scale, zero = rtn.scale_zero(scaled.amin(-1, keepdim=True), scaled.amax(-1, keepdim=True), bits, symmetric)
    restored = rtn.dequantize(rtn.quantize(scaled, scale, zero, bits), scale, zero)  # [out, n_groups, g]
    return (restored.reshape(w.shape) / s).to(w.dtype)


@dataclass
class Search:
    """The outcome of one mapping's grid search."""

    mapping: Mapping
    alpha: float
    duo: bool
    scales: torch.Tensor  # [in]
    errors: list[tuple[float, bool, float]] = field(repr=False)  # (alpha, duo, block-output MSE) per candidate

    @property
    def improvement(self) -> float:
        """Best error / error without scaling (alpha = 0, plain): below 1 means AWQ helped."""
        return min(e for *_, e in self.errors) / self.errors[0][2]


@torch.no_grad()
def search_scales(
    parent: torch.nn.Module, balance: list[torch.nn.Linear], x_mean: torch.Tensor, parent_inputs: list[tuple[tuple, dict]],
    mapping: Mapping, bits: int = 4, group_size: int | None = 128, symmetric: bool = False, n_grid: int = 20, duo: bool = True,
) -> Search:  # fmt: skip
    """Try each candidate scale on the balance layers; keep the one whose parent output is closest to full precision.

    A candidate whose error is NaN or infinite is skipped; none left raises a :class:`LessonError`.
    """
    original = [b.weight.data.clone() for b in balance]
    reference = [_output(parent(*args, **kwargs)) for args, kwargs in parent_inputs]
    if not all(torch.isfinite(r).all() for r in reference):
        raise LessonError(
            f"{mapping.parent} gives NaN or infinite outputs before any quantization: the model overflows on this "
            "calibration text (float16 activations can; load the model in bfloat16 or float32)."
        )
    w_mean = mean_normalised_weight(original, group_size) if duo else None
    errors, best = [], None
    try:
        for alpha, use_duo in grid(n_grid, duo):
            s = scales_for(alpha, x_mean, w_mean if use_duo else None)
            for layer, w in zip(balance, original):
                layer.weight.data = quantize_scaled(w, s, bits, group_size, symmetric)
            error = _mse(reference, [_output(parent(*args, **kwargs)) for args, kwargs in parent_inputs])
            errors.append((alpha, use_duo, error))
            if math.isfinite(error) and (best is None or error < best[2]):
                best = (alpha, use_duo, error, s)
    finally:
        for layer, w in zip(balance, original):
            layer.weight.data = w
    if best is None:
        raise LessonError(
            f"Every candidate scale for {mapping.smooth} -> {', '.join(mapping.balance)} gave a NaN or infinite error: "
            "the quantized weights hold NaN or inf (check the balance layers' weights for NaN, and for groups that are "
            "all zero under zero-point quantization)."
        )
    return Search(mapping, best[0], best[1], best[3], errors)


@torch.no_grad()
def fold(smooth: torch.nn.Module, balance: list[torch.nn.Linear], s: torch.Tensor) -> None:
    """Scale the balance layers' input columns by ``s`` and the producer's outputs by ``1/s``: same function, in place."""
    for layer in balance:
        layer.weight.data = (layer.weight.data * s.to(layer.weight.device)).to(layer.weight.dtype)
    s = s.to(smooth.weight.device)
    if smooth.weight.ndim == 1:  # a norm's per-channel gain
        smooth.weight.data = (smooth.weight.data / s).to(smooth.weight.dtype)
    else:  # a linear layer: its output rows
        smooth.weight.data[-len(s):] = (smooth.weight.data[-len(s):] / s[:, None]).to(smooth.weight.dtype)
    if getattr(smooth, "bias", None) is not None:
        smooth.bias.data = (smooth.bias.data / s).to(smooth.bias.dtype)


@torch.no_grad()
def scale_block(
    block: torch.nn.Module, inputs: list[tuple[tuple, dict]], mappings: tuple[Mapping, ...] = LLAMA,
    bits: int = 4, group_size: int | None = 128, symmetric: bool = False, n_grid: int = 20, duo: bool = True,
) -> list[Search]:  # fmt: skip
    """AWQ on one decoder layer, in place: collect statistics in one pass, then search and fold each mapping in order."""
    if not inputs:
        raise LessonError("AWQ got no calibration inputs: its scales come from activation statistics, so pass at least one sequence.")
    mappings = mappings_for(block, mappings)
    modules = dict(block.named_modules())
    x_sums: dict[Mapping, list] = {m: [0.0, 0] for m in mappings}
    parent_inputs: dict[str, list] = {m.parent: [] for m in mappings}

    def keep_mean(m: Mapping):
        def hook(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1])
            x_sums[m][0] = x_sums[m][0] + x.abs().float().sum(0)
            x_sums[m][1] += x.shape[0]
        return hook

    def keep_inputs(name: str):
        def hook(module, args, kwargs):
            parent_inputs[name].append((args, kwargs))
        return hook

    hooks = [modules[m.balance[0]].register_forward_hook(keep_mean(m)) for m in mappings]
    hooks += [modules[name].register_forward_pre_hook(keep_inputs(name), with_kwargs=True) for name in parent_inputs]
    try:
        for args, kwargs in inputs:
            block(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    searches = []
    for m in mappings:
        balance = [modules[name] for name in m.balance]
        x_mean = x_sums[m][0] / x_sums[m][1]  # [in]
        search = search_scales(modules[m.parent], balance, x_mean, parent_inputs[m.parent], m, bits, group_size, symmetric, n_grid, duo)
        fold(modules[m.smooth], balance, search.scales)
        searches.append(search)
    return searches


@torch.no_grad()
def quantize_model(
    model, calibration: torch.Tensor, bits: int = 4, group_size: int | None = 128, symmetric: bool = False,
    n_grid: int = 20, duo: bool = True, mappings: tuple[Mapping, ...] = LLAMA, skip: tuple[str, ...] = ("lm_head",),
    clip: bool = False, progress: bool = True,
) -> list[Search]:  # fmt: skip
    """AWQ-scale every decoder layer in turn, then round-to-nearest quantize them all, in place. Returns every search.

    ``calibration`` is a LongTensor ``[n, tokens]``. Each layer sees the outputs of the
    layers before it, scaled but not yet quantized: llm-compressor's ``AWQModifier``
    followed by a ``QuantizationModifier`` does the same (the tests check it).
    ``clip=True`` adds the original AWQ's clipping search (:func:`clip_block`) after the scales.
    """
    from tqdm import tqdm

    for linear in rtn.linear_layers(model, skip).values():  # fail before changing anything
        rtn.check(bits, group_size, linear.in_features)
    layers = decoder_layers(model)
    mappings_for(layers[0], mappings)
    if calibration.ndim != 2 or calibration.numel() == 0:
        raise LessonError(
            f"calibration must be token ids of shape [n, tokens] with n and tokens at least 1, not {tuple(calibration.shape)}: "
            "AWQ's scales come from activation statistics (a few dozen sequences of 256 or more tokens is usual)."
        )
    inputs = first_layer_inputs(model, calibration)
    searches = []
    for layer in tqdm(layers, desc="AWQ, layer by layer", disable=not progress):
        searches += scale_block(layer, inputs, mappings, bits, group_size, symmetric, n_grid, duo)
        if clip:
            clip_block(layer, inputs, bits, group_size, symmetric)
        inputs = [next_layer_inputs(layer(*args, **kwargs), args, kwargs) for args, kwargs in inputs]
    rtn.quantize_model(model, bits, group_size, symmetric, skip)
    return searches


def keep_salient(
    w: torch.Tensor, importance: torch.Tensor, fraction: float = 0.01, bits: int = 4, group_size: int | None = 128,
    symmetric: bool = False,
) -> torch.Tensor:  # fmt: skip
    """Quantize ``w`` but keep the ``fraction`` of input columns with the largest ``importance`` unquantized.

    The experiment behind AWQ: choose the columns by activation magnitude and the
    error falls far more than choosing them by weight magnitude or at random.
    """
    keep = importance.topk(max(1, round(fraction * w.shape[1]))).indices  # [k]
    out = rtn.fake_quantize(w, bits, group_size, symmetric)
    out[:, keep] = w[:, keep]
    return out


@torch.no_grad()
def search_clip(
    w: torch.Tensor, x: torch.Tensor, bits: int = 4, group_size: int | None = 128, symmetric: bool = False,
    n_grid: int = 20, max_shrink: float = 0.5,
) -> torch.Tensor:  # fmt: skip
    """The original AWQ's second search: shrink each group's range ``[-m, m]`` to minimise the output error.

    ``w`` is ``[out, in]``, ``x`` a sample of inputs ``[tokens, in]``. Returns the clipped
    weight (quantize it afterwards). llm-compressor's AWQModifier does not run this step.
    """
    groups = rtn.grouped(w.float(), group_size)  # [out, n_groups, g]
    x_groups = x.to(w.device, torch.float32).reshape(x.shape[0], groups.shape[1], groups.shape[2])  # [tokens, n_groups, g]
    reference = torch.einsum("ong,tng->otn", groups, x_groups)  # [out, tokens, n_groups]: each group's share of y
    limit = groups.abs().amax(-1, keepdim=True)  # [out, n_groups, 1]
    best_error = torch.full(limit.shape, float("inf"), device=w.device)
    best = limit.clone()
    for i in range(int(max_shrink * n_grid)):
        m = limit * (1 - i / n_grid)
        clipped = torch.clamp(groups, -m, m).reshape(w.shape)
        q = rtn.grouped(rtn.fake_quantize(clipped, bits, group_size, symmetric), group_size)
        error = (torch.einsum("ong,tng->otn", q, x_groups) - reference).pow(2).mean(1)[..., None]  # [out, n_groups, 1]
        better = error < best_error
        best_error, best = torch.where(better, error, best_error), torch.where(better, m, best)
    return torch.clamp(groups, -best, best).reshape(w.shape).to(w.dtype)


@torch.no_grad()
def clip_block(
    block: torch.nn.Module, inputs: list[tuple[tuple, dict]], bits: int = 4, group_size: int | None = 128,
    symmetric: bool = False, n_tokens: int = 512, skip: tuple[str, ...] = ("q_proj", "k_proj"),
) -> None:  # fmt: skip
    """:func:`search_clip` on each linear layer of a block, on its first ``n_tokens`` inputs, in place.

    Like AutoAWQ, it leaves the query and key projections alone: their output error says
    little about the attention pattern they produce.
    """
    seen: dict[str, list[torch.Tensor]] = {}
    linears = {name: m for name, m in rtn.linear_layers(block).items() if not name.endswith(skip)}
    hooks = [m.register_forward_hook(lambda m, args, out, name=name: seen.setdefault(name, []).append(args[0].detach()))
             for name, m in linears.items()]  # fmt: skip
    try:
        for args, kwargs in inputs:
            block(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    for name, linear in linears.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[name]])[:n_tokens]  # [tokens, in]
        linear.weight.data = search_clip(linear.weight.data, x, bits, group_size, symmetric)


def _output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _mse(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    """Mean squared error over every element of every batch (llm-compressor's AWQ loss)."""
    total = sum(torch.nn.functional.mse_loss(o.float(), r.float(), reduction="sum") for r, o in zip(reference, outputs))
    return (total / sum(r.numel() for r in reference)).item()
