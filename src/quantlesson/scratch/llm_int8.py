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


def vectorwise_quantize(A: torch.Tensor, threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise absmax int8 codes of ``A`` [rows, columns], the row absmax, and the outlier columns.

    With ``threshold > 0`` every column holding a value of magnitude ``>= threshold`` is an outlier
    column: its codes are set to 0 (it is computed in 16 bits instead).
    """
    A = A.float().clone()
    outliers = A.abs() >= threshold if threshold > 0 else torch.zeros_like(A, dtype=torch.bool)
    columns = torch.nonzero(outliers.any(dim=0)).flatten()  # input features with an outlier
    A[outliers] = 0
    absmax = A.abs().amax(dim=1)  # [rows]
    codes = torch.round(A * (127.0 / absmax[:, None])).to(torch.int8)
    codes[:, columns] = 0
    return codes, absmax, columns


def int8_matmul(X: torch.Tensor, W: torch.Tensor, threshold: float = 6.0) -> torch.Tensor:
    """``X @ W.T`` with int8 weights and activations, outlier columns of ``X`` in 16 bits (threshold 0: none)."""
    qx, sx, columns = vectorwise_quantize(X, threshold)  # [tokens, in], [tokens], [k]
    qw, sw, _ = vectorwise_quantize(W)  # [out, in], [out]
    Y = (qx.to(torch.int32) @ qw.to(torch.int32).T).float() * (torch.outer(sx, sw) / (127 * 127))  # [tokens, out]
    if columns.numel():
        W_outlier = qw[:, columns].float() * (sw[:, None] / 127)  # the weight's int8 columns, dequantized
        Y += X[:, columns].float() @ W_outlier.T
    return Y


def bits_per_weight(layers) -> float:
    """Storage per weight of int8 ``nn.Linear`` layers: 8 bits of code plus one float32 scale per output row."""
    layers = list(layers)
    weights = sum(layer.in_features * layer.out_features for layer in layers)
    return 8 + 32 * sum(layer.out_features for layer in layers) / weights
