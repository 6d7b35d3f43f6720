"""kernels: PyTorch's int4 kernel needs an NVIDIA GPU of compute capability 8.0 or newer, and says so."""

import pytest
import torch

from quantlesson import LessonError, kernels


def test_without_a_gpu_the_int4_path_says_what_to_do(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LessonError, match="needs an NVIDIA GPU"):
        kernels.quantize_to_int4pack(torch.nn.Sequential(torch.nn.Linear(256, 256)))


def test_on_a_t4_the_int4_path_names_the_capability_it_needs(fake_t4):
    with pytest.raises(LessonError, match=r"compute capability 8\.0 or newer.*Tesla T4.*7\.5"):
        kernels.quantize_to_int4pack(torch.nn.Sequential(torch.nn.Linear(256, 256)))
