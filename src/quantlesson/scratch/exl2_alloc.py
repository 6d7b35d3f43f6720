"""EXL2's idea from scratch: measure every layer under every setting, then spend a bits-per-weight budget where it helps most.

ExLlamaV2's converter quantizes with GPTQ, but not every layer alike: a
*measurement pass* quantizes each linear layer at each candidate setting and
records the error, then an optimiser picks one setting per layer so that the
average bits per weight meet a target (say 4.0) with the least total error.
Layers that barely suffer at 2 or 3 bits pay for layers that need 6.

Here a setting is ``(bits, group_size)`` for the whole layer, costing
``bits + 32 / group_size`` bits per weight (a 16-bit scale and a 16-bit zero
per group). EXL2's own candidates are finer (a layer may mix, say, 10 % of its
columns at 5 bits with 90 % at 4); the allocation works the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch

from quantlesson.errors import LessonError
from quantlesson.scratch import gptq, rtn

SETTINGS = tuple((bits, group) for bits in (2, 3, 4, 5, 6, 8) for group in (32, 128))


def cost(bits: int, group_size: int) -> float:
    """Bits per weight of a setting: the codes plus a 16-bit scale and a 16-bit zero-point per group."""
    if group_size < 1:
        raise LessonError(f"group_size={group_size}: a group is a positive number of columns, such as 32 or 128.")
    return bits + 32 / group_size


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """Relative output error ``tr(dW H dW^T) / tr(W H W^T)``: how much the layer's output changes, on calibration inputs.

    ``W`` and ``W_hat`` are ``[out, in]``, ``H`` is ``[in, in]``; an all-zero layer kept at zero has error 0.
    """
    if H.shape != (W.shape[1], W.shape[1]) or W_hat.shape != W.shape:
        raise LessonError(f"output_error needs W and W_hat [out, in] and H [in, in]; got {tuple(W.shape)}, "
                          f"{tuple(W_hat.shape)} and {tuple(H.shape)}: pass the Hessian of this layer's inputs.")  # fmt: skip
    delta = W_hat - W
    return (torch.trace(delta @ H @ delta.T) / torch.trace(W @ H @ W.T).clamp(min=torch.finfo(H.dtype).tiny)).item()


@torch.no_grad()
def hessians(model, calibration: torch.Tensor, skip: tuple[str, ...] = ("lm_head",)) -> dict[str, torch.Tensor]:
    """Each linear layer's input Hessian ``2 X^T X / n`` on the calibration tokens ``[n, tokens]``, in one pass."""
    check_calibration(calibration)
    layers = rtn.linear_layers(model, skip)
    sums = {name: [torch.zeros(m.in_features, m.in_features), 0] for name, m in layers.items()}  # on the CPU: one per layer

    def accumulate(name):
        def hook(module, args, output):
            sums[name][0], sums[name][1] = gptq.add_to_hessian(sums[name][0], sums[name][1], args[0].detach().float().cpu())
        return hook

    hooks = [m.register_forward_hook(accumulate(name)) for name, m in layers.items()]
    try:
        for batch in calibration.split(8):
            model(input_ids=batch.to(next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: H / n for name, (H, n) in sums.items()}


def check_calibration(calibration: torch.Tensor) -> None:
    """Raise a clear :class:`LessonError` unless ``calibration`` is a batch of token ids ``[n, tokens]``."""
    if calibration.dim() != 2:
        raise LessonError(f"calibration must be [n, tokens], got shape {tuple(calibration.shape)}: "
                          "use data.calibration_tokens(tokenizer), or add a batch dimension with ids[None].")  # fmt: skip
    if calibration.is_floating_point() or calibration.is_complex():
        raise LessonError(f"calibration holds {calibration.dtype} values, not token ids: use data.calibration_tokens(tokenizer).")


def measure(model, calibration: torch.Tensor, settings=SETTINGS, method: str = "rtn", progress: bool = True) -> pd.DataFrame:
    """The measurement pass: one row per (layer, setting) with its bits per weight and output error.

    ``method="gptq"`` measures each setting with GPTQ, as ExLlamaV2 does; the default,
    round-to-nearest, is some fifty times faster on a CPU and ranks the settings much the same.
    """
    from tqdm import tqdm

    if method not in ("rtn", "gptq"):
        raise LessonError(f"method={method!r}: measure with 'rtn' or 'gptq'.")
    check_calibration(calibration)
    for linear in rtn.linear_layers(model).values():  # every setting must fit every layer: fail before the long pass
        for bits, group in settings:
            rtn.check(bits, group, linear.in_features)
    H = hessians(model, calibration)
    rows = []
    for name, linear in tqdm(rtn.linear_layers(model).items(), desc="measuring", disable=not progress):
        W = linear.weight.detach().float().cpu()
        for bits, group in settings:
            if method == "rtn":
                W_hat = rtn.fake_quantize(W, bits, group, symmetric=False)
            else:
                q, scale, zero = gptq.gptq(W.clone(), H[name], bits, group, symmetric=False)
                W_hat = rtn.dequantize(rtn.grouped(q, group), scale[..., None], zero[..., None]).reshape(W.shape)
            rows.append({"layer": name, "bits": bits, "group_size": group, "bpw": cost(bits, group),
                         "weights": W.numel(), "error": output_error(W, W_hat, H[name])})  # fmt: skip
    return pd.DataFrame(rows)


def check_measurement(measurement: pd.DataFrame, target_bpw: float) -> None:
    """Raise a clear :class:`LessonError` for a measurement or target that :func:`allocate` cannot use."""
    missing = {"layer", "bits", "group_size", "bpw", "weights", "error"} - set(measurement.columns)
    if missing:
        raise LessonError(f"the measurement lacks the columns {sorted(missing)}: pass the table that measure() returns.")
    if measurement.empty:
        raise LessonError("the measurement is empty: run measure() on a model with linear layers first.")
    bad = measurement.loc[measurement["error"].isna(), "layer"].unique()
    if len(bad):
        raise LessonError(f"the measurement has NaN errors in {list(bad)[:3]}: check those weights for NaN, then measure again.")
    if math.isnan(target_bpw):
        raise LessonError("target_bpw is NaN: give a number of bits per weight, such as 4.0.")


def frontier(options: pd.DataFrame) -> pd.DataFrame:
    """A layer's useful settings: sorted by cost, each with a lower error than every cheaper one."""
    options = options.sort_values(["bpw", "error"])
    return options[options["error"] < options["error"].cummin().shift(fill_value=float("inf"))]


@dataclass
class Allocation:
    """One setting per layer, and what it costs."""

    settings: dict[str, tuple[int, int]]  # layer -> (bits, group_size)
    bpw: float  # average bits per weight over all layers
    error: float  # sum of the layers' relative output errors


def allocate(measurement: pd.DataFrame, target_bpw: float) -> Allocation:
    """Greedy allocation: start every layer at its cheapest setting, then keep buying the upgrade
    that removes the most error per extra bit, while the average stays within ``target_bpw``."""
    check_measurement(measurement, target_bpw)
    fronts = {layer: frontier(rows).reset_index(drop=True) for layer, rows in measurement.groupby("layer", sort=False)}
    weights = {layer: int(rows["weights"].iloc[0]) for layer, rows in fronts.items()}
    total = sum(weights.values())
    if target_bpw < sum(rows["bpw"].iloc[0] * weights[layer] for layer, rows in fronts.items()) / total:
        cheapest = min(rows["bpw"].min() for rows in fronts.values())
        raise LessonError(f"target_bpw={target_bpw} is below the cheapest setting ({cheapest:.3f} bits per weight).")
    chosen = {layer: 0 for layer in fronts}  # index into each frontier
    spent = sum(fronts[layer]["bpw"].iloc[0] * weights[layer] for layer in fronts)
    while True:
        best, best_gain = None, 0.0
        for layer, i in chosen.items():
            if i + 1 < len(fronts[layer]):
                now, nxt = fronts[layer].iloc[i], fronts[layer].iloc[i + 1]
                extra = (nxt["bpw"] - now["bpw"]) * weights[layer]
                gain = (now["error"] - nxt["error"]) / extra
                if spent + extra <= target_bpw * total and gain > best_gain:
                    best, best_gain = layer, gain
        if best is None:
            break
        spent += (fronts[best]["bpw"].iloc[chosen[best] + 1] - fronts[best]["bpw"].iloc[chosen[best]]) * weights[best]
        chosen[best] += 1
    picks = {layer: fronts[layer].iloc[i] for layer, i in chosen.items()}
    return Allocation(settings={layer: (int(r["bits"]), int(r["group_size"])) for layer, r in picks.items()},
                      bpw=spent / total, error=float(sum(r["error"] for r in picks.values())))  # fmt: skip


def uniform(measurement: pd.DataFrame, bits: int, group_size: int) -> Allocation:
    """Every layer at the same setting, for comparison."""
    rows = measurement[(measurement["bits"] == bits) & (measurement["group_size"] == group_size)]
    if rows.empty:
        raise LessonError(f"({bits}, {group_size}) was not measured: choose one of {sorted(set(zip(measurement['bits'], measurement['group_size'])))}.")
    return Allocation(settings={layer: (bits, group_size) for layer in rows["layer"]},
                      bpw=cost(bits, group_size), error=float(rows["error"].sum()))  # fmt: skip
