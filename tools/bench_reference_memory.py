"""Benchmark: peak memory of evaluate.reference + evaluate.compare as the vocabulary grows.

    .venv/bin/python tools/bench_reference_memory.py [tokens]

A stand-in model with uniform logits (no weights to speak of) isolates the cost of the
reference log-probabilities: tokens x vocabulary x 4 bytes, which the lesson keeps in
memory up to evaluate.IN_MEMORY_LIMIT and streams from disk above it. Prints one row
per vocabulary: SmolLM2's 49,152, Llama 3's 128,256 and Gemma 3's 262,144.
"""

from __future__ import annotations

import sys
import tempfile
from types import SimpleNamespace

import torch

from quantlesson import evaluate, measure


class Uniform(torch.nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))  # (a new class per call would hold its logits until the next garbage collection)


def main(tokens: int = 4096) -> None:
    ids = torch.randint(0, 4096, (tokens,))
    print(f"{'vocabulary':>10} {'reference size':>15} {'kept':>7} {'peak increase':>14} {'seconds':>8}")
    for vocab in (4096, 49_152, 128_256, 262_144):
        with tempfile.TemporaryDirectory() as folder, measure.PeakMemory() as memory:
            ref = evaluate.reference(Uniform(vocab), ids, progress=False, folder=folder)
            evaluate.compare(Uniform(vocab), ref, progress=False)
            kept = "disk" if ref.path else "memory"
            del ref
        print(f"{vocab:>10,} {(tokens - 1) * vocab * 4 / 1e9:>12.2f} GB {kept:>7} {memory.increase / 1e9:>11.2f} GB {memory.seconds:>8.1f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4096)
