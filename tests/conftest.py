"""Shared fixtures: a tiny random Llama (fast) and, where a test needs trained weights, the embedded model."""

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_llama():
    """A 2-layer random Llama with hidden size 64 (built in milliseconds)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def embedded():
    """The embedded model and tokenizer (built once per machine, then cached)."""
    from quantlesson import models

    return models.load("embedded", device="cpu")


@pytest.fixture
def fake_t4(monkeypatch):
    """Make torch see a Tesla T4 (compute capability 7.5): for the messages of paths that need 8.0 or newer."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
