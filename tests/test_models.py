"""models: loading (embedded, local folder, hub offline), clear errors, shape twins."""

import pytest
import torch

from quantlesson import LessonError, models


def test_embedded_model_loads_through_from_pretrained_and_says_so(embedded, capsys):
    model, tokenizer = models.load("embedded", device="cpu")
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("Model: embedded") and "float32 on cpu" in line
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert config.tie_word_embeddings and config.num_key_value_heads < config.num_attention_heads
    assert config.hidden_size % 256 == 0 and config.intermediate_size % 256 == 0
    assert config.max_position_embeddings >= 2048
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    text = "def add(a, b):\n    return a + b\n"
    assert tokenizer.decode(tokenizer(text).input_ids) == text  # byte-level BPE round-trips


def test_a_local_folder_loads(embedded, tmp_path):
    model, tokenizer = embedded
    model.save_pretrained(tmp_path / "copy")
    tokenizer.save_pretrained(tmp_path / "copy")
    again, _ = models.load(str(tmp_path / "copy"), device="cpu")
    assert torch.equal(again.model.norm.weight, model.model.norm.weight)


@pytest.fixture
def saved_copy(embedded, tmp_path):
    """The embedded model and tokenizer saved to a folder of their own, as if carried to another machine."""
    model, tokenizer = embedded
    model.save_pretrained(tmp_path / "copy")
    tokenizer.save_pretrained(tmp_path / "copy")
    return tmp_path / "copy"


def _with_recipe(folder):
    from quantlesson import embedded as builder

    (folder / "recipe.json").write_text((builder.ensure_built(progress=False) / "recipe.json").read_text())
    return folder


def test_rows_name_the_embedded_model_also_when_it_is_a_copied_folder(saved_copy):
    assert models.label(str(saved_copy)) == str(saved_copy)  # any saved model: named by its path
    _with_recipe(saved_copy)
    assert models.label(str(saved_copy)) == "embedded"  # the embedded model carried to another machine as a folder
    assert models.label("embedded") == "embedded"
    assert models.label("facebook/opt-125m") == "facebook/opt-125m"


def test_a_copied_embedded_model_keeps_its_results_table(saved_copy, monkeypatch):
    from quantlesson import report

    monkeypatch.delenv("LESSON_RESULTS", raising=False)
    monkeypatch.setenv("LESSON_MODEL", str(_with_recipe(saved_copy)))
    assert report.results_folder().name == "embedded"
    monkeypatch.setenv("LESSON_MODEL", "facebook/opt-125m")
    assert report.results_folder().name == "facebook--opt-125m"


def test_a_missing_folder_says_so(tmp_path):
    with pytest.raises(LessonError, match="does not exist"):
        models.load(str(tmp_path / "no-such-model"))


def test_a_folder_without_a_config_says_so(tmp_path):
    with pytest.raises(LessonError, match="no config.json"):
        models.load(str(tmp_path))


def test_a_folder_without_a_tokenizer_says_so(embedded, tmp_path):
    model, _ = embedded
    model.save_pretrained(tmp_path / "no-tokenizer")
    with pytest.raises(LessonError, match="no tokenizer"):
        models.load(str(tmp_path / "no-tokenizer"))


def test_a_hub_id_offline_names_the_embedded_switch(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    with pytest.raises(LessonError, match="LESSON_MODEL=embedded"):
        models.load("HuggingFaceTB/SmolLM2-135M", device="cpu")


def test_cuda_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(LessonError, match="needs an NVIDIA GPU"):
        models.load("embedded", device="cuda")


def test_chosen_model_defaults_to_smollm2(monkeypatch):
    monkeypatch.delenv("LESSON_MODEL", raising=False)
    assert models.chosen_model() == "HuggingFaceTB/SmolLM2-135M"
    monkeypatch.setenv("LESSON_MODEL", "embedded")
    assert models.chosen_model() == "embedded"


@pytest.mark.parametrize(
    "name,parameters",
    # The parameter counts the model cards state (SmolLM2-135M: 134.5 M, Llama-3.2-1B: 1.24 B, Llama-3.1-8B: 8.03 B).
    [("SmolLM2-135M", 134_515_008), ("Llama-3.2-1B", 1_235_814_400), ("Llama-3.1-8B", 8_030_261_248)],
)
def test_shape_twins_have_the_real_parameter_counts(name, parameters):
    twin = models.twin(name, device="meta")
    assert models.parameter_count(twin) == parameters
    assert all(p.device.type == "meta" for p in twin.parameters())


def test_an_unknown_twin_lists_the_known_ones():
    with pytest.raises(LessonError, match="Llama-3.1-8B"):
        models.twin("GPT-5")


def test_bitsandbytes_4bit_on_cpu_refuses_shapes_its_kernel_cannot_pack(tmp_path):
    from transformers import BitsAndBytesConfig, LlamaConfig

    LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, head_dim=12).save_pretrained(tmp_path)
    from quantlesson import embedded

    embedded.train_tokenizer(["def f(x): return x"], vocab_size=300).save_pretrained(tmp_path)
    with pytest.raises(LessonError, match="multiple of 32"):
        models.load(str(tmp_path), quantization_config=BitsAndBytesConfig(load_in_4bit=True), device="cpu")


@pytest.mark.parametrize(
    ("capability", "dtype", "int4_runs"),
    [((7, 5), torch.float16, False), ((7, 0), torch.float16, False), ((8, 0), torch.bfloat16, True), ((9, 0), torch.bfloat16, True)],
)
def test_the_dtype_and_skips_follow_the_gpus_compute_capability(monkeypatch, capsys, capability, dtype, int4_runs):
    """Colab's T4 (7.5) and a V100 (7.0) get float16 and a skip message; Ampere (8.0) and Hopper (9.0) bfloat16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    assert models.default_dtype("cuda") == dtype
    assert models.default_dtype("cpu") == torch.float32
    assert models.can_run("PyTorch's int4 kernel") is int4_runs
    out = capsys.readouterr().out
    if int4_runs:
        assert out == ""
        models.require_capability("EXL3")
    else:
        assert "Skipped: PyTorch's int4 kernel needs compute capability 8.0" in out and "Fake GPU" in out
        with pytest.raises(LessonError, match="EXL3 needs compute capability 8.0"):
            models.require_capability("EXL3")


def test_without_a_gpu_capability_checks_say_so(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.gpu_capability() is None and not models.has_capability(7, 0)
    assert not models.can_run("Marlin")
    assert "no GPU is visible" in capsys.readouterr().out
    with pytest.raises(LessonError, match="needs an NVIDIA GPU"):
        models.require_capability("Marlin")


def test_a_folder_with_a_broken_config_is_not_called_a_hub_failure(saved_copy):
    (saved_copy / "config.json").write_text("{ not json")
    with pytest.raises(LessonError) as error:
        models.load(str(saved_copy), device="cpu")
    assert "local folder" in str(error.value) and "Hub" not in str(error.value)


def test_the_load_line_names_the_device_the_model_is_on(saved_copy, capsys):
    models.load(str(saved_copy), device_map="cpu")
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("float32 on cpu")


def test_a_module_without_a_config_gets_a_clear_error():
    from quantlesson.scratch import awq, gptq

    plain = torch.nn.Sequential(torch.nn.Linear(64, 64))
    for call in (lambda: models.decoder_layers(plain),
                 lambda: gptq.quantize_model(plain, torch.randint(0, 10, (4, 64)), bits=4, group_size=32, progress=False),
                 lambda: awq.quantize_model(plain, torch.randint(0, 10, (4, 64)), bits=4, group_size=32)):
        with pytest.raises(LessonError, match="no .config"):
            call()
