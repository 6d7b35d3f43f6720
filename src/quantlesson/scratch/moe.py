"""Mixture-of-experts models and calibration, from scratch: which expert sees which calibration token.

A mixture-of-experts (MoE) layer replaces one MLP by ``E`` experts and a *router*: for each token the router
scores every expert (``softmax(x G^T)``, ``G`` of shape ``[E, hidden]``), keeps the ``top_k`` best and mixes
their outputs. Qwen3-30B-A3B has 128 experts and uses 8 per token; Mixtral has 8 and uses 2.

For calibration that is a problem. GPTQ builds each expert's Hessian ``H = 2 X^T X / n`` from the tokens
*routed to that expert*. An expert that receives ``n`` tokens has a Hessian of rank at most ``n``: with fewer
tokens than the hidden size it is singular, GPTQ's damping term decides the result, and with no tokens at all
there is nothing to calibrate on. Two remedies, both here:

* more (and more varied) calibration text, checked with :func:`expert_token_counts` and :func:`check_coverage`;
* routing calibration tokens through *every* expert while keeping the layer's output unchanged
  (llm-compressor's ``moe_calibrate_all_experts``): :func:`expert_inputs` with ``all_experts=True``.

The router (``gate``) stays unquantized: it is small, and a changed routing decision changes which weights a
token uses at all. Shapes follow transformers' Qwen3-MoE: experts stored as 3-D tensors
``gate_up_proj [E, 2 * inter, hidden]`` and ``down_proj [E, hidden, inter]``.
"""

from __future__ import annotations

import warnings

import torch

from quantlesson.errors import LessonError
from quantlesson.scratch import gptq, rtn


def route(x: torch.Tensor, router_weight: torch.Tensor, top_k: int, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts each token goes to and their mixing weights: ``[tokens, top_k]`` indices and weights."""
    probabilities = torch.softmax(x.float() @ router_weight.float().T, dim=-1)  # [tokens, E]
    weights, experts = torch.topk(probabilities, top_k, dim=-1)
    if normalize:  # Qwen3-MoE's norm_topk_prob: the kept weights sum to 1
        weights = weights / weights.sum(-1, keepdim=True)
    return experts, weights


def moe_blocks(model) -> list[torch.nn.Module]:
    """The model's MoE layers (modules with a router ``gate`` and 3-D ``experts``), with a clear error for a dense model."""
    blocks = [m for m in model.modules() if hasattr(m, "gate") and hasattr(getattr(m, "experts", None), "gate_up_proj")]
    if not blocks:
        raise LessonError(
            f"{type(model).__name__} has no mixture-of-experts layers (a router 'gate' and 'experts' with 3-D "
            "gate_up_proj): this code reads Qwen3-MoE-style models; a dense model has no experts to count."
        )
    return blocks


@torch.no_grad()
def expert_inputs(model, input_ids: torch.Tensor, all_experts: bool = False) -> list[list[torch.Tensor]]:
    """For every MoE layer and expert, the hidden states that reach it: ``[layer][expert] -> [n_tokens, hidden]``.

    ``all_experts=True`` gives every expert every token, as llm-compressor's ``moe_calibrate_all_experts`` does
    during calibration; the model's own output is the same either way (only what the experts *see* changes).
    """
    blocks = moe_blocks(model)
    captured: list[list[torch.Tensor]] = [[] for _ in blocks]

    def hook(index: int, block: torch.nn.Module):
        def capture(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1])  # [tokens, hidden]
            experts, _ = route(x, block.gate.weight, block.gate.top_k, getattr(block.gate, "norm_topk_prob", True))
            n_experts = block.experts.gate_up_proj.shape[0]
            captured[index] = [
                x if all_experts else x[(experts == e).any(-1)] for e in range(n_experts)
            ]
        return capture

    handles = [block.register_forward_hook(hook(i, block)) for i, block in enumerate(blocks)]
    try:
        model(input_ids=input_ids.to(next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
    return captured


def expert_token_counts(inputs: list[list[torch.Tensor]]) -> torch.Tensor:
    """How many calibration tokens each expert saw: ``[layers, experts]`` (the counts llama.cpp's imatrix keeps too)."""
    return torch.tensor([[x.shape[0] for x in layer] for layer in inputs])


def hessian(x: torch.Tensor) -> torch.Tensor:
    """GPTQ's ``H = 2 X^T X``, summed as :func:`quantlesson.scratch.gptq.add_to_hessian` sums it, over one expert's
    inputs ``[n, hidden]``, divided by its ``n`` tokens (zeros when it saw none)."""
    total, _ = gptq.add_to_hessian(torch.zeros(x.shape[-1], x.shape[-1], device=x.device), 0, x)
    return total / max(x.shape[0], 1)


def check_coverage(counts: torch.Tensor, minimum: int, strict: bool = False) -> list[tuple[int, int, int]]:
    """The (layer, expert, tokens) of every expert that saw fewer than ``minimum`` calibration tokens.

    Warns (or, with ``strict=True``, raises) with what to do. A sensible ``minimum`` is the hidden size: below
    it the expert's Hessian cannot be full rank.
    """
    starved = [(layer, expert, int(counts[layer, expert])) for layer, expert in (counts < minimum).nonzero().tolist()]
    if starved:
        empty = sum(1 for *_, n in starved if n == 0)
        message = (
            f"{len(starved)} of {counts.numel()} experts saw fewer than {minimum} calibration tokens ({empty} saw none): "
            "their Hessians are singular and GPTQ falls back on damping. Use more and more varied calibration text, "
            "or route calibration through every expert (expert_inputs(..., all_experts=True); llm-compressor: "
            "oneshot(..., moe_calibrate_all_experts=True))."
        )
        if strict:
            raise LessonError(message)
        warnings.warn(message, stacklevel=2)
    return starved


def gptq_from_tokens(W: torch.Tensor, X: torch.Tensor, bits: int = 4, group_size: int | None = 32) -> torch.Tensor:
    """``W [out, in]`` quantized by GPTQ with the Hessian of the ``n`` calibration inputs ``X [n, in]`` an expert saw;
    returned dequantized, in float32. No tokens is a clear error (there is no Hessian to use)."""
    if X.shape[0] == 0:
        raise LessonError("This expert saw no calibration tokens, so GPTQ has no Hessian: route calibration through every "
                          "expert (expert_inputs(..., all_experts=True)) or quantize it without calibration (RTN).")
    codes, scale, zero = gptq.gptq(W.float(), hessian(X.float()), bits, group_size, symmetric=True)  # [out, in], [out, groups]
    restored = rtn.dequantize(rtn.grouped(codes, group_size), scale[..., None].float(), zero[..., None].float())
    return restored.reshape(W.shape)


def output_error(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    """Relative error of a layer's outputs on inputs ``X [n, in]``: ``||X (W_hat - W)^T||^2 / ||X W^T||^2``."""
    X, W = X.float(), W.float()
    return ((X @ (W_hat.float() - W).T).pow(2).sum() / (X @ W.T).pow(2).sum()).item()
