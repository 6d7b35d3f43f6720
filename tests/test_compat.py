"""Each workaround in quantlesson.compat: the library still fails without it, and works with it."""

import os
import subprocess
import sys
import textwrap

import pytest

GPTQMODEL_QUANTIZE = textwrap.dedent(
    """
    import os, sys, torch
    {prelude}
    from transformers import LlamaConfig, LlamaForCausalLM, AutoTokenizer
    from quantlesson import embedded
    folder = sys.argv[1]
    torch.manual_seed(0)
    tokenizer = embedded.train_tokenizer(["def f(x): return x + 1; " * 50], vocab_size=300)
    tokenizer.save_pretrained(folder)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=64))
    model.save_pretrained(folder)
    from gptqmodel import GPTQModel, QuantizeConfig
    quantizer = GPTQModel.load(folder, QuantizeConfig(bits=4, group_size=128), device="cpu")
    quantizer.quantize([{{"input_ids": list(range(i, i + 64)), "attention_mask": [1] * 64}} for i in range(8)], batch_size=4)
    print("quantized")
    """
)


def run(prelude: str, folder) -> subprocess.CompletedProcess:
    folder.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "GPTQMODEL_CPU_WORKERS"}
    return subprocess.run([sys.executable, "-c", GPTQMODEL_QUANTIZE.format(prelude=prelude), str(folder)],
                          capture_output=True, text=True, env=env, cwd=folder, timeout=600)


@pytest.mark.skipif((os.cpu_count() or 0) > 2, reason="the bug shows on machines with two cores")
def test_gptqmodel_needs_cpu_workers_on_two_cores(tmp_path):
    without = run("", tmp_path / "a")
    assert without.returncode != 0 and "Virtual pool 'model_loader:cpu' requests 2 workers" in without.stderr
    with_fix = run("from quantlesson import compat; compat.gptqmodel_cpu_workers()", tmp_path / "b")
    assert with_fix.returncode == 0 and "quantized" in with_fix.stdout, with_fix.stderr[-2000:]


def _bnb_round_trip(tmp_path, workaround: bool) -> float:
    """Largest logit difference between a 4-bit model that ran on the CPU and its saved-and-reloaded copy."""
    import torch
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    from quantlesson import compat, models

    torch.manual_seed(0)
    source = tmp_path / "source"
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=64)).save_pretrained(source)
    from quantlesson import embedded

    embedded.train_tokenizer(["def f(x): return x + 1; " * 50], vocab_size=256).save_pretrained(source)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model, _ = models.load(str(source), quantization_config=config, device_map="cpu")
    if workaround:
        compat.bitsandbytes_keep_saveable(model)
    ids = torch.arange(16)[None]
    with torch.no_grad():
        before = model(ids).logits.float()
    model.save_pretrained(tmp_path / "saved")
    embedded.train_tokenizer(["x"], vocab_size=256).save_pretrained(tmp_path / "saved")
    reloaded, _ = models.load(str(tmp_path / "saved"), device_map="cpu")
    compat.bitsandbytes_keep_saveable(reloaded)  # compare like with like: the same (generic) CPU kernel
    with torch.no_grad():
        return (reloaded(ids).logits.float() - before).abs().max().item()


def test_bitsandbytes_saving_after_cpu_inference_needs_the_workaround(tmp_path):
    import torch

    pytest.importorskip("bitsandbytes")
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        pytest.skip("the repacking happens on CPUs with AVX512")
    assert _bnb_round_trip(tmp_path / "without", workaround=False) > 0.1  # the bug: the saved weights are wrong
    assert _bnb_round_trip(tmp_path / "with", workaround=True) == 0.0


AWQ_ONESHOT = textwrap.dedent(
    """
    import torch
    {prelude}
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from quantlesson import embedded
    torch.manual_seed(0)
    tokenizer = embedded.train_tokenizer(["def f(x): return x + 1; " * 50], vocab_size=300)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=32))
    import sys
    model.save_pretrained(sys.argv[1]); tokenizer.save_pretrained(sys.argv[1])
    model = LlamaForCausalLM.from_pretrained(sys.argv[1])
    rows = [{{"input_ids": list(range(i, i + 32)), "attention_mask": [1] * 32}} for i in range(4)]
    oneshot(model=model, processor=tokenizer, dataset=Dataset.from_list(rows), num_calibration_samples=4, max_seq_length=32,
            recipe=[AWQModifier(n_grid=3), QuantizationModifier(targets="Linear", scheme="W4A16_ASYM", ignore=["lm_head"])])
    print("quantized")
    """
)


def run_awq(prelude: str, folder) -> subprocess.CompletedProcess:
    folder.mkdir()
    return subprocess.run([sys.executable, "-c", AWQ_ONESHOT.format(prelude=prelude), str(folder)],
                          capture_output=True, text=True, cwd=folder, timeout=600)


@pytest.mark.skipif(__import__("torch").accelerator.is_available(), reason="the bug shows without an accelerator")
def test_llmcompressor_awq_needs_the_workaround_without_a_gpu(tmp_path):
    without = run_awq("", tmp_path / "a")
    assert without.returncode != 0 and "Cannot access accelerator device" in without.stderr
    with_it = run_awq("from quantlesson import compat; assert compat.llmcompressor_awq_on_cpu()", tmp_path / "b")
    assert with_it.returncode == 0, with_it.stderr[-2000:]
    assert "quantized" in with_it.stdout


def test_exllamav2_rope_theta_is_copied_where_exllamav2_reads_it(tmp_path, embedded):
    """transformers 5 saves rope_theta inside rope_parameters; ExLlamaV2 0.3.2 reads only the top-level key."""
    import json

    from quantlesson import compat

    model, _ = embedded
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "rope_theta" not in config and config["rope_parameters"]["rope_theta"] == 100_000  # still the v5 layout
    assert compat.exllamav2_rope_theta(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["rope_theta"] == 100_000
    assert not compat.exllamav2_rope_theta(tmp_path)  # once is enough


def _exllamav2_source(module_file: str) -> str:
    """One file of the installed exllamav2, as text (reading it needs no GPU); skip where it is not installed."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("exllamav2")
    if spec is None:
        pytest.skip("exllamav2 is not installed here (it needs an NVIDIA GPU)")
    return (Path(spec.origin).parent / module_file).read_text()


def test_exllamav2_still_reads_only_the_top_level_rope_theta():
    """Where ExLlamaV2 is installed, its config reader still looks only for the top-level key."""
    source = _exllamav2_source("config.py")
    assert '"rope_theta"' in source and "rope_parameters" not in source


def test_exllamav2_causal_attention_switches_to_the_masked_path(monkeypatch):
    """The workaround sets EXLLAMA_NO_SDPA (inherited by the converter) and switches an imported exllamav2 too."""
    import importlib.util
    import types

    from quantlesson import compat

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed: ExLlamaV2 does not take the faulty SDPA branch")
    monkeypatch.delenv("EXLLAMA_NO_SDPA", raising=False)
    imported = types.SimpleNamespace(has_lower_right_sdpa=True)
    monkeypatch.setitem(sys.modules, "exllamav2.attn", imported)
    assert compat.exllamav2_causal_attention()
    assert os.environ["EXLLAMA_NO_SDPA"] == "1" and imported.has_lower_right_sdpa is False
    assert not compat.exllamav2_causal_attention()  # once is enough; a value you set yourself is kept


def test_exllamav2_sdpa_attention_still_sees_later_tokens(tmp_path):
    """On an NVIDIA GPU without flash-attn: position 0 of ExLlamaV2's SDPA path depends on the last token."""
    import importlib.util

    import torch

    if not torch.cuda.is_available() or importlib.util.find_spec("exllamav2") is None:
        pytest.skip("needs an NVIDIA GPU with exllamav2 installed")
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed: ExLlamaV2 does not take the faulty SDPA branch")
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantlesson import exl2

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, max_position_embeddings=2048, tie_word_embeddings=True,
                         initializer_range=0.1)  # fmt: skip
    LlamaForCausalLM(config).half().save_pretrained(tmp_path)
    model = exl2.ExLlamaV2Model(tmp_path, max_seq_len=256).model  # the lesson's loader (it applies the workaround)
    import exllamav2.attn as attn

    ids = torch.randint(0, 4096, (1, 32))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 4096

    def change_at_position_0(sdpa: bool) -> float:
        attn.has_lower_right_sdpa, model.config.no_sdpa = sdpa, not sdpa  # the module's switch and the config's
        return (model.forward(ids)[0, 0].float() - model.forward(changed)[0, 0].float()).abs().max().item()

    default = attn.has_lower_right_sdpa, model.config.no_sdpa
    try:
        leak = change_at_position_0(sdpa=True)  # the library's choice wherever PyTorch has SDPA
        fixed = change_at_position_0(sdpa=False)  # what compat.exllamav2_causal_attention selects
    finally:
        attn.has_lower_right_sdpa, model.config.no_sdpa = default
    print(f"position 0 moves by {leak:.3g} through SDPA, {fixed:.3g} through the masked path")
    assert fixed <= 1e-3, "the masked attention path should be causal"
    assert leak > 1e-3, "ExLlamaV2's SDPA path is causal now: compat.exllamav2_causal_attention can go"


def test_exllamav2_sdpa_branch_still_drops_the_causal_mask():
    """Where ExLlamaV2 is installed (no GPU needed to read it): the SDPA branch still takes the block-diagonal mask."""
    source = _exllamav2_source("attn.py")
    assert "if self.layer_idx in attn_params.block_diag_layers or causal:" in source
