"""GPTQ from scratch (Frantar, Ashkboos, Hoefler and Alistarh, 2022, arXiv:2210.17323).

For one linear layer with weight ``W`` (rows x columns) and calibration inputs
``X`` (tokens x columns), GPTQ looks for quantized weights ``Q`` that keep the
layer's output: it minimises ``||W X^T - Q X^T||^2``. The Hessian of that error
is ``H = 2 X^T X``. GPTQ quantizes one column at a time and pushes each
column's rounding error onto the columns not yet quantized, weighted by
``H^-1`` (the optimal brain quantization update), using the Cholesky form of
``H^-1`` for numerical stability and lazy batches of columns for speed.

Conventions follow llm-compressor's GPTQ (scales from the original weights,
one per group, "static" groups under act-order; 1 % dampening), so the tests
can check this code against it code for code. Quantizer: :mod:`quantlesson.scratch.rtn`.
"""

from __future__ import annotations

import torch

from quantlesson.errors import LessonError
from quantlesson.models import decoder_layers
from quantlesson.scratch import rtn


def add_to_hessian(H: torch.Tensor, n: int, inputs: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Add a batch of layer inputs ``[batch, tokens, columns]`` to the running sum ``H = 2 * sum x x^T``.

    Returns the new sum and the number of sequences seen; the Hessian is ``H / n``.
    """
    X = inputs.reshape(-1, inputs.shape[-1]).float()  # [tokens, columns]
    return H + 2 * X.T @ X, n + (inputs.shape[0] if inputs.ndim == 3 else 1)


def inverse_cholesky(H: torch.Tensor, W: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1``. Dead columns (never active) get weight 0 and ``H_ii = 1``."""
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0])  # dampening keeps H invertible
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


def gptq(
    W: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int | None = 128, symmetric: bool = True,
    act_order: bool = False, block_size: int = 128, percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Quantize ``W`` [rows, columns] given the Hessian ``H`` [columns, columns] of its inputs.

    Returns codes ``[rows, columns]`` (int8) and scale, zero ``[rows, n_groups]``, in
    the same layout as :func:`quantlesson.scratch.rtn.quantize_weight`.
    ``act_order`` quantizes the columns with the largest ``H_ii`` (the most active inputs) first.
    """
    rows, columns = W.shape
    rtn.check(bits, group_size, columns)
    if H.shape != (columns, columns):
        raise LessonError(f"The Hessian must be {columns} x {columns} for this layer, not {tuple(H.shape)}.")
    _, scale, zero = rtn.quantize_weight(W, bits, group_size, symmetric)  # static groups: from the original weights
    group_of = torch.arange(columns) // (group_size or columns)  # [columns] -> its group
    W = W.clone().float()
    order = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(columns)
    W, H, group_of = W[:, order], H[order][:, order], group_of[order]
    Hinv = inverse_cholesky(H.float(), W, percdamp)  # [columns, columns], upper triangular
    Q = torch.zeros(rows, columns, dtype=torch.int8)
    for i1 in range(0, columns, block_size):  # lazy batch: update the rest of W once per block
        i2 = min(i1 + block_size, columns)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]  # [rows], scalar
            g = group_of[i1 + i]
            q = rtn.quantize(w, scale[:, g], zero[:, g], bits)  # [rows] codes
            err = (w - rtn.dequantize(q, scale[:, g], zero[:, g])) / d
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]  # spread the error over the remaining columns
            Err1[:, i], Q[:, i1 + i] = err, q
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q[:, torch.argsort(order)], scale, zero


def quantize_layer(linear: torch.nn.Linear, H: torch.Tensor, bits: int = 4, group_size: int | None = 128, symmetric: bool = True, act_order: bool = False) -> rtn.QuantLinear:
    """A :class:`~quantlesson.scratch.rtn.QuantLinear` holding the GPTQ codes of ``linear``."""
    q, scale, zero = gptq(linear.weight.detach().float(), H, bits, group_size, symmetric, act_order)
    layer = rtn.QuantLinear(linear.in_features, linear.out_features, bits, group_size, symmetric, linear.bias is not None)
    layer.set_codes(q, scale, zero, linear.bias)
    return layer.to(linear.weight.device)


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
    per_layer: dict[str, tuple[int, int | None]] | None = None,
):  # fmt: skip
    """GPTQ every linear layer of a decoder-only model, one decoder layer at a time, in place.

    ``calibration`` is a LongTensor ``[n, tokens]``. Each decoder layer is run on
    the outputs of the already-quantized layers before it, so later layers
    correct for earlier layers' errors (llm-compressor's sequential pipeline does the same).
    ``per_layer`` maps a layer's full name to its own ``(bits, group_size)`` (mixed precision, as in EXL2).
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
    for layer in tqdm(layers, desc="GPTQ, layer by layer", disable=not progress):
        linears = rtn.linear_layers(layer)
        sums = {name: [torch.zeros(m.in_features, m.in_features), 0] for name, m in linears.items()}

        def accumulate(name):
            def hook(module, args, output):
                sums[name][0], sums[name][1] = add_to_hessian(sums[name][0], sums[name][1], args[0].detach().cpu())
            return hook

        hooks = [m.register_forward_hook(accumulate(name)) for name, m in linears.items()]
        for args, kwargs in inputs:
            layer(*args, **kwargs)
        for hook in hooks:
            hook.remove()
        for name, linear in linears.items():
            H, n = sums[name]
            layer_bits, layer_group = setting[id(linear)]
            rtn.replace_module(layer, name, quantize_layer(linear, H / n, layer_bits, layer_group, symmetric, act_order))
        inputs = [next_layer_inputs(layer(*args, **kwargs), args, kwargs) for args, kwargs in inputs]
    return model


def next_layer_inputs(output, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The next layer's inputs: this layer's output in place of its hidden states."""
    hidden = output[0] if isinstance(output, tuple) else output
    if args:
        return (hidden,) + args[1:], kwargs
    return args, {**kwargs, "hidden_states": hidden}
