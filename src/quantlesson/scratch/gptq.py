"""GPTQ from scratch (Frantar, Ashkboos, Hoefler and Alistarh, 2022, arXiv:2210.17323).

For one linear layer with weight ``W`` (rows x columns) and calibration inputs
``X`` (tokens x columns), GPTQ looks for quantized weights ``Q`` that keep the
layer's output: it minimises ``||W X^T - Q X^T||^2``. The Hessian of that error
is ``H = 2 X^T X``. GPTQ quantizes one column at a time and pushes each
column's rounding error onto the columns not yet quantized, weighted by
``H^-1`` (the optimal brain quantization update), using the Cholesky form of
``H^-1`` for numerical stability and lazy batches of columns for speed.

Two maintained libraries make different choices; :func:`gptq` does either, and the
tests check each against its library code for code:

* **llm-compressor** (``GPTQModifier``, 0.14): *static groups*, each group's scale
  and zero from the original weights, computed in the weight's dtype (bfloat16
  scales for a bfloat16 model); 1 % dampening (``dampening_frac=0.01``); act-order
  on by default (``actorder="static"``: every column in order of ``H_ii``); a
  Hessian that Cholesky cannot factor falls back to round-to-nearest, with a warning.
  Here: ``static_groups=True, percdamp=0.01, act_order=True``.
* **GPTQModel** (7.6) and the reference code (IST-DASLab ``gptq``): *dynamic groups*,
  each group's scale and zero refit in float32 from the error-updated weights when
  the quantizer reaches the group's first column; 5 % dampening (``damp_percent=0.05``,
  raised in steps of 1 % while Cholesky fails); ``desc_act=False`` and
  ``static_groups=False`` by default, with *group-aware* act-order on
  (``act_group_aware``: whole groups in order of their largest ``H_ii``, columns
  within a group in order of ``H_ii``), so groups stay contiguous.
  Here: ``static_groups=False, percdamp=0.05, act_order=True``.

The defaults here (``static_groups=True, percdamp=0.01, act_order=False``) are
llm-compressor's but for act-order. Work is in float32 on the weight's device;
a Hessian that cannot be factored raises a :class:`LessonError` that says what to change.
Quantizer: :mod:`quantlesson.scratch.rtn`.
"""

from __future__ import annotations

import torch

from quantlesson.errors import LessonError
from quantlesson.models import decoder_layers
from quantlesson.scratch import rtn


def add_to_hessian(H: torch.Tensor, n: int, inputs: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Add a batch of layer inputs ``[batch, tokens, columns]`` to the running sum ``H = 2 * sum x x^T``.

    The sum stays on ``H``'s device, in float32. Returns the new sum and the number
    of sequences seen; the Hessian is ``H / n``.
    """
    X = inputs.reshape(-1, inputs.shape[-1]).to(H.device, torch.float32)  # [tokens, columns]
    return H + 2 * X.T @ X, n + (inputs.shape[0] if inputs.ndim == 3 else 1)


def inverse_cholesky(H: torch.Tensor, W: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1`` with ``damp = percdamp * mean(H_ii)``, on ``H``'s device.

    Dead columns (never active) get weight 0 in ``W`` and ``H_ii = 1``. A Hessian with
    NaN or infinite entries, or one that is still not positive definite after
    dampening, raises a :class:`LessonError` (llm-compressor falls back to
    round-to-nearest for that layer; GPTQModel raises the dampening until it factors).
    """
    if not torch.isfinite(H).all():
        raise LessonError(
            "The Hessian has NaN or infinite entries: the layer's inputs overflowed (float16 activations can; "
            "load the model in bfloat16 or float32) or the calibration text gave NaN activations."
        )
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))  # dampening keeps H invertible
    try:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError as error:
        raise LessonError(
            f"The Hessian is not positive definite even with percdamp={percdamp}: raise percdamp (GPTQModel tries "
            f"+0.01 at a time) or calibrate on more, more varied tokens (a layer with {H.shape[0]} inputs needs "
            f"many more than {H.shape[0]})."
        ) from error


def column_order(h: torch.Tensor, group_size: int, act_order: bool, static_groups: bool) -> torch.Tensor:
    """The order GPTQ quantizes the columns in, from ``h = diag(H)`` ``[columns]``.

    Without act-order: left to right. With act-order and static groups: every column
    by ``H_ii``, largest first (llm-compressor). Dynamic groups fit a group's scale from
    all its columns at once, so groups stay whole: groups by their largest ``H_ii``,
    columns by ``H_ii`` within each group (GPTQModel's ``act_group_aware``).
    """
    if not act_order:
        return torch.arange(len(h), device=h.device)
    if static_groups:
        return torch.argsort(h, descending=True)
    within = torch.sort(h.reshape(-1, group_size), dim=1, descending=True)  # [n_groups, group_size]
    groups = torch.argsort(within.values[:, 0], descending=True, stable=True)  # [n_groups]
    first_column = group_size * torch.arange(len(groups), device=h.device)[:, None]  # [n_groups, 1]
    return (within.indices + first_column)[groups].reshape(-1)


def quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, static_groups: bool) -> torch.Tensor:
    """Codes of one column ``[rows]``, rounded as each library rounds them.

    llm-compressor (compressed-tensors) rounds ``w / scale + zero``; GPTQModel rounds
    ``w / scale``, then adds ``zero``. They differ only for a weight exactly halfway
    between two levels with an odd zero-point (ties go to the even integer), which
    bfloat16's coarse weights make common enough to matter: GPTQ spreads every difference on.
    """
    if static_groups:
        return rtn.quantize(w, scale, zero, bits)
    qmin, qmax = rtn.qrange(bits)
    return torch.clamp(torch.round(w / scale) + zero, qmin, qmax).to(torch.int8)


def gptq(
    W: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int | None = 128, symmetric: bool = True,
    act_order: bool = False, block_size: int = 128, percdamp: float = 0.01, static_groups: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Quantize ``W`` [rows, columns] given the Hessian ``H`` [columns, columns] of its inputs.

    Returns codes ``[rows, columns]`` (int8) and scale, zero ``[rows, n_groups]`` on
    ``W``'s device, in the layout of :func:`quantlesson.scratch.rtn.quantize_weight`.
    ``static_groups=True`` takes each group's scale and zero from the original ``W``, in
    ``W``'s dtype (llm-compressor: bfloat16 weights give bfloat16 scales, used and
    returned as such); ``False`` refits them in float32 from the error-updated weights
    when the quantizer reaches the group's first column (GPTQModel, the reference code).
    Each mode also rounds as its library does (:func:`quantize_column`).
    ``act_order`` quantizes the most active inputs first (:func:`column_order`).
    """
    if W.ndim != 2 or H.ndim != 2:
        raise LessonError(f"gptq takes a weight matrix [rows, columns] and its Hessian, not shapes {tuple(W.shape)} and {tuple(H.shape)}.")
    rows, columns = W.shape
    rtn.check(bits, group_size, columns)
    if H.shape != (columns, columns):
        raise LessonError(f"The Hessian must be {columns} x {columns} for this layer, not {tuple(H.shape)}.")
    size = group_size or columns
    H = H.to(W.device, torch.float32)
    order = column_order(torch.diag(H), size, act_order, static_groups)  # [columns]
    group_of = (torch.arange(columns, device=W.device) // size)[order]  # [columns] -> its group, in quantization order
    if static_groups:  # from the original weights, in their dtype
        groups = rtn.grouped(W, group_size)  # [rows, n_groups, group_size]
        scale, zero = rtn.scale_zero(groups.amin(-1), groups.amax(-1), bits, symmetric)  # [rows, n_groups]
    else:  # filled in group by group below
        scale = torch.zeros(rows, columns // size, device=W.device)
        zero = torch.zeros_like(scale)
    W, H = W.float()[:, order], H[order][:, order]  # copies, in quantization order
    Hinv = inverse_cholesky(H, W, percdamp)  # [columns, columns], upper triangular
    Q = torch.zeros(rows, columns, dtype=torch.int8, device=W.device)
    for i1 in range(0, columns, block_size):  # lazy batch: update the rest of W once per block
        i2 = min(i1 + block_size, columns)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j, g = i1 + i, group_of[i1 + i]
            if not static_groups and j % size == 0:  # a group's first column: fit the group as it is now
                # From W, as GPTQModel and the reference code do: updated up to this block's start
                # (a group that starts inside the block misses the block's own updates so far).
                scale[:, g], zero[:, g] = rtn.scale_zero(W[:, j:j + size].amin(1), W[:, j:j + size].amax(1), bits, symmetric)
            w, d = W1[:, i], Hinv1[i, i]  # [rows], scalar
            q = quantize_column(w, scale[:, g], zero[:, g], bits, static_groups)  # [rows] codes
            err = (w - rtn.dequantize(q, scale[:, g], zero[:, g])) / d
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]  # spread the error over the remaining columns
            Err1[:, i], Q[:, j] = err, q
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q[:, torch.argsort(order)], scale, zero


def quantize_layer(
    linear: torch.nn.Linear, H: torch.Tensor, bits: int = 4, group_size: int | None = 128, symmetric: bool = True,
    act_order: bool = False, static_groups: bool = True, percdamp: float = 0.01,
) -> rtn.QuantLinear:  # fmt: skip
    """A :class:`~quantlesson.scratch.rtn.QuantLinear` holding the GPTQ codes of ``linear``, on its device."""
    weight = linear.weight.detach()
    q, scale, zero = gptq(weight, H, bits, group_size, symmetric, act_order, percdamp=percdamp, static_groups=static_groups)
    layer = rtn.QuantLinear(linear.in_features, linear.out_features, bits, group_size, symmetric, linear.bias is not None)
    layer.set_codes(q, scale, zero, linear.bias)
    return layer.to(weight.device)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the first decoder layer's inputs are captured."""


def first_layer_inputs(model, calibration: torch.Tensor) -> list[tuple[tuple, dict]]:
    """Run the model up to its first decoder layer, once per calibration sequence; keep that layer's inputs."""
    captured = []

    def capture(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    hook = decoder_layers(model)[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for sequence in calibration:  # [tokens]
            try:
                model(input_ids=sequence[None].to(model.device), use_cache=False)
            except _Stop:
                pass
    finally:
        hook.remove()
    return captured


@torch.no_grad()
def quantize_model(
    model, calibration: torch.Tensor, bits: int = 4, group_size: int | None = 128, symmetric: bool = True,
    act_order: bool = False, skip: tuple[str, ...] = ("lm_head",), progress: bool = True,
    per_layer: dict[str, tuple[int, int | None]] | None = None, static_groups: bool = True, percdamp: float = 0.01,
):  # fmt: skip
    """GPTQ every linear layer of a decoder-only model, one decoder layer at a time, in place.

    ``calibration`` is a LongTensor ``[n, tokens]``. Each decoder layer is run on
    the outputs of the already-quantized layers before it, so later layers
    correct for earlier layers' errors (llm-compressor's sequential pipeline does the same).
    Each layer's Hessian is summed in float32 on that layer's device.
    ``per_layer`` maps a layer's full name to its own ``(bits, group_size)`` (mixed precision, as in EXL2).
    ``static_groups`` and ``percdamp``: see :func:`gptq` (GPTQModel's defaults: ``False`` and ``0.05``).
    """
    from tqdm import tqdm

    layers = decoder_layers(model)
    per_layer = per_layer or {}
    if unknown := sorted(set(per_layer) - set(rtn.linear_layers(model, skip))):
        raise LessonError(f"per_layer names layers the model does not have (or skips): {unknown[:3]}")
    setting = {id(m): per_layer.get(name, (bits, group_size)) for name, m in rtn.linear_layers(model, skip).items()}
    widest = 0
    for linear in rtn.linear_layers(model, skip).values():
        rtn.check(*setting[id(linear)], linear.in_features)
        widest = max(widest, linear.in_features)
    if calibration.ndim != 2:
        raise LessonError(f"calibration must be token ids of shape [n, tokens], not {tuple(calibration.shape)}.")
    if calibration.numel() < widest:
        raise LessonError(
            f"{calibration.numel()} calibration tokens are too few: the Hessian of a layer with {widest} inputs "
            f"needs at least {widest} tokens to have full rank. Use more or longer sequences "
            "(a few hundred sequences of 256 or more tokens is usual)."
        )
    inputs = first_layer_inputs(model, calibration)
    for index, layer in enumerate(tqdm(layers, desc="GPTQ, layer by layer", disable=not progress)):
        linears = rtn.linear_layers(layer)
        sums = {name: [torch.zeros(m.in_features, m.in_features, device=m.weight.device), 0] for name, m in linears.items()}

        def accumulate(name):
            def hook(module, args, output):
                sums[name][0], sums[name][1] = add_to_hessian(sums[name][0], sums[name][1], args[0].detach())
            return hook

        hooks = [m.register_forward_hook(accumulate(name)) for name, m in linears.items()]
        for args, kwargs in inputs:
            layer(*args, **kwargs)
        for hook in hooks:
            hook.remove()
        for name, linear in linears.items():
            H, n = sums[name]
            layer_bits, layer_group = setting[id(linear)]
            try:
                quantized = quantize_layer(linear, H / n, layer_bits, layer_group, symmetric, act_order, static_groups, percdamp)
            except LessonError as error:
                raise LessonError(f"Decoder layer {index}, {name}: {error}") from error
            rtn.replace_module(layer, name, quantized)
        inputs = [next_layer_inputs(layer(*args, **kwargs), args, kwargs) for args, kwargs in inputs]
    return model


def next_layer_inputs(output, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The next layer's inputs: this layer's output in place of its hidden states."""
    hidden = output[0] if isinstance(output, tuple) else output
    if args:
        return (hidden,) + args[1:], kwargs
    return args, {**kwargs, "hidden_states": hidden}
