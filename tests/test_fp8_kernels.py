"""W8A8 FP8 through torch._scaled_mm: the arithmetic, checked on a CPU (the kernel runs there too, slowly)."""

import pytest
import torch

from quantlesson import LessonError, fp8_kernels, models
from quantlesson.scratch import fp8


def test_activation_codes_are_per_token_and_reach_the_e4m3_maximum():
    x = torch.randn(5, 64) * torch.tensor([[1.0], [10.0], [0.01], [100.0], [3.0]])
    codes, scale = fp8_kernels.quantize_activations(x)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (5, 1)
    assert torch.equal(codes.float().abs().amax(-1), torch.full((5,), 448.0))  # each row uses the whole range
    assert torch.allclose(codes.float() * scale, x, rtol=2**-3)  # E4M3 keeps 3 mantissa bits
    zero_codes, zero_scale = fp8_kernels.quantize_activations(torch.zeros(2, 64))
    assert torch.all(zero_codes.float() == 0) and torch.all(zero_scale > 0)


def test_the_layer_equals_the_product_of_the_dequantized_operands():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=True)
    layer = fp8_kernels.Fp8Linear.from_linear(linear)
    x = torch.randn(3, 7, 64, dtype=torch.bfloat16)
    codes, scale = fp8.quantize_weight(linear.weight.detach().float(), "channel")
    x_codes, x_scale = fp8_kernels.quantize_activations(x.reshape(-1, 64))
    expected = (x_codes.float() * x_scale) @ fp8.dequantize(codes, scale).T + linear.bias.detach().bfloat16().float()
    y = layer(x)
    assert y.shape == (3, 7, 48) and y.dtype == torch.bfloat16
    # the kernel accumulates in float32 and rounds once to bfloat16 (8 bits of mantissa); the bias adds one rounding
    assert torch.allclose(y.float().reshape(-1, 48), expected, rtol=2**-7, atol=2**-7 * expected.abs().max().item())


def test_quantize_to_fp8_replaces_every_linear_but_the_head(tiny_llama):
    import copy

    model = fp8_kernels.quantize_to_fp8(copy.deepcopy(tiny_llama).to(torch.bfloat16))
    kinds = {name: type(module).__name__ for name, module in model.named_modules() if name.endswith(("_proj", "lm_head"))}
    assert kinds.pop("lm_head") == "Linear"
    assert set(kinds.values()) == {"Fp8Linear"}
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    with torch.no_grad():
        ours, reference = model(ids).logits.float(), tiny_llama(ids).logits.float()
    assert torch.isfinite(ours).all()
    assert (ours.argmax(-1) == reference.argmax(-1)).float().mean() > 0.5  # 8 bits keep most greedy choices


def test_widths_the_kernel_cannot_take_are_a_clear_error():
    with pytest.raises(LessonError, match="divisible by 16"):
        fp8_kernels.Fp8Linear.from_linear(torch.nn.Linear(60, 48))


def test_the_benchmark_says_what_it_needs_without_a_capable_gpu(monkeypatch, capsys):
    monkeypatch.setattr(models, "gpu_capability", lambda: (8, 0))  # an A100: FP8 tensor cores arrived with 8.9
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA A100")
    assert fp8_kernels.fp8_benchmark() is None
    assert "8.9" in capsys.readouterr().out


def test_the_committed_h200_run_holds_what_the_page_says():
    """07b's page: in the committed run W8A8 FP8 was slower than bfloat16 at prefill and at decode, though each
    decode step read fewer bytes of weights. Re-running the H200 cell may change that: then change the page."""
    from pathlib import Path

    import pandas as pd

    run = pd.read_csv(Path(__file__).resolve().parents[1] / "results" / "gpu-fp8-speed.csv")
    bf16, fp8_row = run[run["weights"] == "bfloat16"].iloc[0], run[run["weights"].str.startswith("fp8")].iloc[0]
    assert fp8_row["gb_per_step"] < bf16["gb_per_step"]
    assert fp8_row["prefill_tokens_per_s"] < bf16["prefill_tokens_per_s"]
    assert fp8_row["decode_tokens_per_s"] < bf16["decode_tokens_per_s"]
    assert set(run["gpu"]) == {"NVIDIA H200"}
    page = (Path(__file__).resolve().parents[1] / "content" / "07b-formats-2026.md").read_text()
    assert "FP8 was *slower* at\nboth" in page
