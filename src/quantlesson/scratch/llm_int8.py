"""LLM.int8() from scratch (Dettmers, Lewis, Belkada and Zettlemoyer, 2022, arXiv:2208.07339).

Vector-wise int8: each row of the activations ``X`` (one token) and each row of
the weight ``W`` (one output) gets its own absmax scale; the product is computed
in integers and rescaled by the outer product of the two scale vectors.

Large models develop *outlier features*: a few input dimensions where some
activations are huge (the paper's threshold: 6.0). One such value would set the
scale of its whole row and wipe out the precision of every other entry. The
mixed-precision decomposition takes those input columns out of the int8 product
and multiplies them in 16 bits. Conventions follow bitsandbytes (``>=`` threshold,
outlier entries zeroed before the row scales are taken, whole outlier columns
dropped from the int8 codes), so the tests can compare the two code for code.
"""

from __future__ import annotations

import torch

from quantlesson.errors import LessonError


def check_rows(A: torch.Tensor, threshold: float = 0.0) -> None:
    """Raise a clear :class:`LessonError` for a tensor that is not real-valued rows of features."""
    if A.dim() < 2:
        raise LessonError(f"expected a 2-D weight [out, in] or activations [..., in], got shape {tuple(A.shape)}: "
                          "add a dimension with A[None] for a single row.")  # fmt: skip
    if not A.is_floating_point():
        raise LessonError(f"expected floating-point values, got {A.dtype}: pass the real-valued tensor, not codes.")
    if A.numel() == 0:
        raise LessonError(f"the tensor of shape {tuple(A.shape)} is empty: there is nothing to quantize.")
    if not A.is_meta and not torch.isfinite(A).all():  # a meta tensor has no values to check
        raise LessonError("the tensor holds NaN or infinite values, which would spoil their whole row: fix them first.")
    if threshold < 0:
        raise LessonError(f"threshold={threshold}: use a magnitude >= 0 (the paper's 6.0); 0 turns the decomposition off.")


def vectorwise_quantize(A: torch.Tensor, threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise absmax int8 codes of ``A`` [rows, columns], the row absmax, and the outlier columns.

    With ``threshold > 0`` every column holding a value of magnitude ``>= threshold`` is an outlier
    column: its codes are set to 0 (it is computed in 16 bits instead). Activations
    ``[batch, tokens, columns]`` are taken as rows ``[batch * tokens, columns]``: codes keep ``A``'s
    shape, the absmax has one value per row ``[batch, tokens]``.
    """
    check_rows(A, threshold)
    rows = A.reshape(-1, A.shape[-1]).float().clone()  # [rows, columns]
    outliers = rows.abs() >= threshold if threshold > 0 else torch.zeros_like(rows, dtype=torch.bool)
    columns = torch.nonzero(outliers.any(dim=0)).flatten()  # input features with an outlier
    rows[outliers] = 0
    absmax = rows.abs().amax(dim=1)  # [rows]
    scale = torch.where(absmax == 0, 0.0, 127.0 / absmax)  # an all-zero row: codes 0
    codes = torch.round(rows * scale[:, None]).to(torch.int8)
    codes[:, columns] = 0
    return codes.reshape(A.shape), absmax.reshape(A.shape[:-1]), columns


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` of int8 codes ``[m, k]`` and ``[n, k]``, summed exactly: int32 ``[m, n]``.

    CUDA has no int32 matrix product; float64 holds every such sum exactly, so the GPU uses it.
    """
    if a.device.type == "cpu":
        return a.to(torch.int32) @ b.to(torch.int32).T
    return (a.double() @ b.double().T).to(torch.int32)


def int8_matmul(X: torch.Tensor, W: torch.Tensor, threshold: float = 6.0) -> torch.Tensor:
    """``X @ W.T`` with int8 weights and activations, outlier columns of ``X`` in 16 bits (threshold 0: none).

    ``X`` is ``[..., in]``, ``W`` is ``[out, in]``; the result is ``[..., out]``.
    """
    if W.dim() != 2:
        raise LessonError(f"expected a 2-D weight [out, in], got shape {tuple(W.shape)}: pass a linear layer's weight.")
    if X.shape[-1] != W.shape[1]:
        raise LessonError(f"X has {X.shape[-1]} features but W takes {W.shape[1]}: X must be [..., in] for W [out, in].")
    X2 = X.reshape(-1, X.shape[-1])  # [tokens, in]
    qx, sx, columns = vectorwise_quantize(X2, threshold)  # [tokens, in], [tokens], [k]
    qw, sw, _ = vectorwise_quantize(W)  # [out, in], [out]
    Y = int_matmul(qx, qw).float() * (torch.outer(sx, sw) / (127 * 127))  # [tokens, out]
    if columns.numel():
        W_outlier = qw[:, columns].float() * (sw[:, None] / 127)  # the weight's int8 columns, dequantized
        Y += X2[:, columns].float() @ W_outlier.T
    return Y.reshape(*X.shape[:-1], W.shape[0])


def bits_per_weight(layers) -> float:
    """Storage per weight of int8 ``nn.Linear`` layers: 8 bits of code plus one float32 scale per output row."""
    layers = list(layers)
    if not layers:
        raise LessonError("no layers given: pass the model's linear layers, e.g. rtn.linear_layers(model).values().")
    weights = sum(layer.in_features * layer.out_features for layer in layers)
    return 8 + 32 * sum(layer.out_features for layer in layers) / weights
