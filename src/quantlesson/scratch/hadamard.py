"""Randomized Hadamard rotations from scratch: spread outliers before quantizing (QuIP#, QuaRot, SpinQuant).

A linear layer computes ``y = x W^T``. For any orthogonal ``R`` (``R R^T = I``), ``y = (x R)(W R)^T``: rotate
the input and the weight's input side and nothing changes. Quantize ``W R`` instead of ``W``. A few large
input channels (outliers) of ``W`` get spread over all channels of ``W R``: the rows become more Gaussian
(lower kurtosis, smaller max / RMS), so a uniform grid fits them better.

The rotation used is a *randomized Hadamard* matrix: Sylvester's ±1 matrix ``H`` (size a power of two) with
its rows flipped by random signs, divided by ``sqrt(n)``. It costs nothing to store (n signs) and applies in
``O(n log n)``. For a size that is not a power of two (SmolLM2's 576 = 9 x 64) this code rotates blocks of the
largest power of two that divides it (block-diagonal), as llm-compressor's ``transform_block_size`` does.

:func:`rotate_residual` fuses one rotation into a Llama model so that it computes the same function
(SpinQuant's *R1*, QuaRot's residual rotation): RMSNorm scales are folded into the next layers first (a norm
without a scale commutes with a rotation: ``||x R|| = ||x||``), then the embeddings and every layer that writes
the residual stream (``o_proj``, ``down_proj``) rotate their output side by ``R``, and every layer that reads it
(``q/k/v``, ``gate/up``, the head) its input side. No extra work at run time.
"""

from __future__ import annotations

import torch

from quantlesson.errors import LessonError


def sylvester(n: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix, ``[n, n]`` of ±1 (float64), for ``n`` a power of two: ``H_2k = [[H, H], [H, -H]]``."""
    if n < 1 or n & (n - 1):
        raise LessonError(f"n={n}: Sylvester's construction needs a power of two (use block_size for other sizes).")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def random_hadamard(n: int, generator: torch.Generator) -> torch.Tensor:
    """``diag(s) H / sqrt(n)``, ``[n, n]`` float64, with random signs ``s`` drawn from ``generator`` (orthogonal)."""
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1  # the draw compressed-tensors makes
    return signs[:, None] * sylvester(n) / n**0.5


def block_size(n: int) -> int:
    """The largest power of two that divides ``n`` (576 -> 64)."""
    return n & -n


def rotation(n: int, seed: int = 0) -> torch.Tensor:
    """An orthogonal ``[n, n]`` float64 rotation: a randomized Hadamard, block-diagonal when ``n`` is no power of two."""
    generator = torch.Generator().manual_seed(seed)
    size = block_size(n)
    return torch.block_diag(*[random_hadamard(size, generator) for _ in range(n // size)])


def kurtosis(w: torch.Tensor) -> torch.Tensor:
    """Kurtosis of each row, ``E[(w - mean)^4] / var^2``: 3 for a Gaussian, far more with outliers."""
    centred = w.double() - w.double().mean(dim=-1, keepdim=True)
    return (centred**4).mean(-1) / (centred**2).mean(-1) ** 2


def max_over_rms(w: torch.Tensor) -> torch.Tensor:
    """``max |w| / RMS(w)`` of each row: how far the largest weight sticks out (what sets an absmax scale)."""
    w = w.double()
    return w.abs().amax(-1) / w.pow(2).mean(-1).sqrt()


def rotate_input_side(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``W R``: the weight ``[out, in]`` of a layer whose input is rotated, ``x -> x R``. Same dtype as ``w``."""
    return (w.double() @ r).to(w.dtype)


def rotate_output_side(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``R^T W``: the weight ``[out, in]`` of a layer whose output is rotated, ``y -> y R``. Same dtype as ``w``."""
    return (r.T @ w.double()).to(w.dtype)


def _layers_of(model):
    """Embedding, decoder layers, final norm and head of a Llama-like model, with a clear error otherwise."""
    from quantlesson import models

    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "norm")
    if inner is None or not all(hasattr(inner, name) for name in needed) or not hasattr(model, "lm_head"):
        raise LessonError(
            f"{type(model).__name__} is not a Llama-like model (model.embed_tokens, model.norm, lm_head): "
            "rotate_residual handles Llama, Mistral, Qwen2/3 and SmolLM blocks."
        )
    layers = models.decoder_layers(model)
    for layer in layers:
        if not all(hasattr(layer, name) for name in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")):
            raise LessonError(f"{type(layer).__name__} lacks Llama's attention/MLP/norm names: rotate_residual cannot fold it.")
    return inner.embed_tokens, layers, inner.norm, model.lm_head


def fold_norm(norm: torch.nn.Module, linears: list[torch.nn.Linear]) -> None:
    """Move an RMSNorm's scale into the layers that read its output: ``W <- W diag(g)``, ``g <- 1``."""
    g = norm.weight.detach().double()
    for linear in linears:
        linear.weight.data = (linear.weight.double() * g).to(linear.weight.dtype)
    norm.weight.data.fill_(1.0)


@torch.no_grad()
def rotate_residual(model, seed: int = 0) -> torch.Tensor:
    """Fuse one rotation of the residual stream into a Llama-like model, in place; the function stays the same.

    Returns the rotation ``R`` ``[hidden, hidden]``. A head tied to the embeddings is untied first (after
    folding the final norm they differ).
    """
    embed, layers, final_norm, head = _layers_of(model)
    if head.weight is embed.weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    for layer in layers:
        attention, mlp = layer.self_attn, layer.mlp
        fold_norm(layer.input_layernorm, [attention.q_proj, attention.k_proj, attention.v_proj])
        fold_norm(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
    fold_norm(final_norm, [head])
    r = rotation(embed.weight.shape[1], seed).to(embed.weight.device)
    embed.weight.data = (embed.weight.double() @ r).to(embed.weight.dtype)  # each token's vector, rotated
    for layer in layers:
        attention, mlp = layer.self_attn, layer.mlp
        for reader in (attention.q_proj, attention.k_proj, attention.v_proj, mlp.gate_proj, mlp.up_proj):
            reader.weight.data = rotate_input_side(reader.weight, r)
        for writer in (attention.o_proj, mlp.down_proj):
            writer.weight.data = rotate_output_side(writer.weight, r)
            if writer.bias is not None:
                writer.bias.data = (writer.bias.double() @ r).to(writer.bias.dtype)
    head.weight.data = rotate_input_side(head.weight, r)
    return r
