"""checkpoints: recognise pre-quantized checkpoints (config.json, GGUF, names) and say where they run fast.

The quantization_config fixtures have the shapes the libraries write: transformers' config classes
(``BitsAndBytesConfig.to_dict``, ``GPTQConfig``, ``AwqConfig``, ``FineGrainedFP8Config``, ``Mxfp4Config``),
compressed-tensors' ``ModelCompressor.update_config`` (version, quant_method, sparsity_config,
transform_config, then the ``QuantizationConfig`` dump), ExLlamaV2's converter, and NVIDIA Model
Optimizer's keys as vLLM reads them. ``test_configs_written_by_the_installed_libraries`` builds some of
them with the installed libraries themselves, so a renamed key fails here.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from quantlesson import LessonError, checkpoints


def _folder(tmp_path: Path, name: str, quantization_config: dict | None = None, **extra) -> Path:
    """A model folder holding only a config.json (with a quantization_config when given)."""
    folder = tmp_path / name
    folder.mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "bfloat16", **extra}
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _args(num_bits, kind, strategy, group_size=None, dynamic=False, scale_dtype=None):
    """One compressed-tensors QuantizationArgs dump."""
    return {"num_bits": num_bits, "type": kind, "symmetric": True, "group_size": group_size, "strategy": strategy,
            "block_structure": None, "dynamic": dynamic, "actorder": None, "scale_dtype": scale_dtype,
            "zp_dtype": None, "observer": None, "observer_kwargs": {}}  # fmt: skip


def _compressed_tensors(weights: dict, activations: dict | None, layout: str) -> dict:
    """A quantization_config as compressed-tensors' ModelCompressor.update_config writes it."""
    return {
        "version": "0.19.0", "quant_method": "compressed-tensors", "sparsity_config": {}, "transform_config": {},
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": activations,
                                      "output_activations": None, "format": None}},
        "kv_cache_scheme": None, "format": layout, "quantization_status": "compressed",
        "global_compression_ratio": None, "ignore": ["lm_head"],
    }  # fmt: skip


GPTQ = {"bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": False, "static_groups": False, "sym": True,
        "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model", "quant_method": "gptq"}  # fmt: skip
AWQ = {"quant_method": "awq", "zero_point": True, "group_size": 128, "bits": 4, "version": "gemm",
       "modules_to_not_convert": None}  # fmt: skip
BNB_NF4 = {"_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": "bfloat16",
           "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
           "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": None,
           "llm_int8_threshold": 6.0, "load_in_4bit": True, "load_in_8bit": False, "quant_method": "bitsandbytes"}  # fmt: skip
BNB_INT8 = {**BNB_NF4, "_load_in_4bit": False, "_load_in_8bit": True, "load_in_4bit": False, "load_in_8bit": True}
FP8_BLOCK = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
GPT_OSS = {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                                      "lm_head"], "quant_method": "mxfp4"}  # fmt: skip
EXL2 = {"quant_method": "exl2", "version": "0.2.8", "bits": 4.25, "head_bits": 6,
        "calibration": {"rows": 115, "length": 2048, "dataset": "(default)"}}  # fmt: skip
MODELOPT_NVFP4 = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16, "ignore": ["lm_head"]}
W4A16 = _compressed_tensors(_args(4, "int", "group", 128), None, "pack-quantized")
FP8_DYNAMIC = _compressed_tensors(_args(8, "float", "channel"), _args(8, "float", "token", dynamic=True), "float-quantized")
NVFP4 = _compressed_tensors(_args(4, "float", "tensor_group", 16, scale_dtype="torch.float8_e4m3fn"),
                            _args(4, "float", "tensor_group", 16, dynamic="local", scale_dtype="torch.float8_e4m3fn"),
                            "nvfp4-pack-quantized")  # fmt: skip
NVFP4A16 = _compressed_tensors(_args(4, "float", "tensor_group", 16, scale_dtype="torch.float8_e4m3fn"), None,
                               "nvfp4-pack-quantized")  # fmt: skip
MXFP4 = _compressed_tensors(_args(4, "float", "group", 32, scale_dtype="torch.uint8"),
                            _args(4, "float", "group", 32, dynamic=True, scale_dtype="torch.uint8"), "mxfp4-pack-quantized")  # fmt: skip
W8A8 = _compressed_tensors(_args(8, "int", "channel"), _args(8, "int", "token", dynamic=True), "int-quantized")


@pytest.mark.parametrize(
    "config, method, bits, group_size, activations",
    [
        (GPTQ, "GPTQ", 4, 128, False),
        ({**GPTQ, "group_size": -1, "bits": 8}, "GPTQ", 8, None, False),
        (AWQ, "AWQ", 4, 128, False),
        (BNB_NF4, "bitsandbytes NF4", 4, 64, False),
        ({**BNB_NF4, "bnb_4bit_quant_type": "fp4"}, "bitsandbytes FP4", 4, 64, False),
        (BNB_INT8, "bitsandbytes int8", 8, None, True),
        (FP8_BLOCK, "FP8", 8, None, True),
        (GPT_OSS, "MXFP4", 4, 32, False),
        (EXL2, "EXL2", 4.25, None, False),
        (MODELOPT_NVFP4, "NVFP4", 4, 16, True),
        (W4A16, "compressed-tensors W4A16", 4, 128, False),
        (FP8_DYNAMIC, "FP8", 8, None, True),
        (NVFP4, "NVFP4", 4, 16, True),
        (NVFP4A16, "NVFP4", 4, 16, False),
        (MXFP4, "MXFP4", 4, 32, True),
        (W8A8, "compressed-tensors W8A8", 8, None, True),
    ],
)
def test_quantization_config_is_read(tmp_path, config, method, bits, group_size, activations):
    checkpoint = checkpoints.describe(_folder(tmp_path, "model", config))
    assert (checkpoint.method, checkpoint.bits, checkpoint.group_size, checkpoint.activations_quantized) == (
        method, bits, group_size, activations)  # fmt: skip
    assert checkpoint.name == "model" and "quantization_config" in checkpoint.evidence


def test_config_json_wins_over_the_name(tmp_path):
    folder = _folder(tmp_path, "Llama-3.1-8B-AWQ", GPTQ)
    checkpoint = checkpoints.describe(str(folder))
    assert checkpoint.method == "GPTQ"
    assert "config.json" in checkpoint.evidence and "from the name" not in checkpoint.evidence


def test_a_folder_without_quantization_config_is_unquantized(tmp_path):
    checkpoint = checkpoints.describe(_folder(tmp_path, "Llama-3.1-8B-GPTQ"))
    assert checkpoint.method == "unquantized" and checkpoint.bits == 16
    assert "no quantization_config" in checkpoint.evidence and "bfloat16" in checkpoint.evidence
    old_exl2 = checkpoints.describe(_folder(tmp_path, "Llama-3-8B-exl2-4.0bpw"))  # its converter may write none
    assert (old_exl2.method, old_exl2.bits) == ("EXL2", 4.0) and "no quantization_config" in old_exl2.evidence


def test_older_model_optimizer_exports_are_read_from_hf_quant_config(tmp_path):
    folder = _folder(tmp_path, "model")
    legacy = {"producer": {"name": "modelopt", "version": "0.29.0"},
              "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16, "exclude_modules": ["lm_head"]}}  # fmt: skip
    (folder / "hf_quant_config.json").write_text(json.dumps(legacy))
    checkpoint = checkpoints.describe(folder)
    assert (checkpoint.method, checkpoint.group_size, checkpoint.activations_quantized) == ("NVFP4", 16, True)
    assert "hf_quant_config.json" in checkpoint.evidence


def test_unknown_quant_methods_say_what_they_are(tmp_path):
    checkpoint = checkpoints.describe(_folder(tmp_path, "model", {"quant_method": "hqq", "nbits": 4}))
    assert checkpoint.method == "unknown" and "'hqq'" in checkpoint.evidence
    algo = checkpoints.describe(_folder(tmp_path, "m2", {"quant_method": "modelopt", "quant_algo": "W4A8_AWQ"}))
    assert algo.method == "unknown" and "W4A8_AWQ" in algo.evidence
    neither = checkpoints.describe(_folder(tmp_path, "m3", {"quant_method": "bitsandbytes"}))
    assert neither.method == "unknown" and "load_in_4bit" in neither.evidence


def test_configs_written_by_the_installed_libraries(tmp_path):
    """Build quantization_configs with transformers' and compressed-tensors' own classes: describe() must read them."""
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
    from transformers import AwqConfig, BitsAndBytesConfig, GPTQConfig

    written = {
        "nf4": (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4").to_dict(), "bitsandbytes NF4", 4),
        "int8": (BitsAndBytesConfig(load_in_8bit=True).to_dict(), "bitsandbytes int8", 8),
        "gptq": (GPTQConfig(bits=3, group_size=32).to_dict(), "GPTQ", 3),
        "awq": (AwqConfig(bits=4, group_size=64).to_dict(), "AWQ", 4),
    }
    for scheme, layout, method, bits in (("W4A16", "pack-quantized", "compressed-tensors W4A16", 4),
                                         ("FP8_DYNAMIC", "float-quantized", "FP8", 8),
                                         ("NVFP4", "nvfp4-pack-quantized", "NVFP4", 4),
                                         ("MXFP4A16", "mxfp4-pack-quantized", "MXFP4", 4)):  # fmt: skip
        config = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(scheme, ["Linear"])}, format=layout,
                                    quantization_status="compressed")  # fmt: skip
        written[scheme] = (json.loads(json.dumps(config.model_dump(), default=str)), method, bits)
    for name, (config, method, bits) in written.items():
        checkpoint = checkpoints.describe(_folder(tmp_path, name, json.loads(json.dumps(config, default=str))))
        assert (checkpoint.method, checkpoint.bits) == (method, bits), name
    assert checkpoints.describe(tmp_path / "gptq").group_size == 32
    assert checkpoints.describe(tmp_path / "NVFP4").activations_quantized
    assert not checkpoints.describe(tmp_path / "MXFP4A16").activations_quantized


def _write_gguf(path: Path, file_type: int | None) -> Path:
    """A tiny GGUF file: one F32 tensor and, if given, a general.file_type."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch="llama")
    writer.add_name("tiny")
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("file_type, type_name, block", [
    ("MOSTLY_Q4_K_M", "Q4_K_M", "Q4_K"), ("MOSTLY_Q8_0", "Q8_0", "Q8_0"), ("MOSTLY_IQ3_M", "IQ3_M", "IQ3_S"),
    ("MOSTLY_F16", "F16", "F16"),
])  # fmt: skip
def test_a_gguf_file_is_read_from_its_file_type(tmp_path, file_type, type_name, block):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

    path = _write_gguf(tmp_path / "model-Q2_K.gguf", LlamaFileType[file_type].value)  # the name says otherwise
    checkpoint = checkpoints.describe(path)
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[block]]
    assert checkpoint.method == "GGUF" and checkpoint.bits == pytest.approx(8 * type_size / block_size)
    assert re.search(rf"general\.file_type {LlamaFileType[file_type].value} = {type_name}\b", checkpoint.evidence)
    assert checkpoint.name == "model-Q2_K.gguf"


def test_a_gguf_without_file_type_and_a_broken_one(tmp_path):
    checkpoint = checkpoints.describe(_write_gguf(tmp_path / "model.gguf", None))
    assert checkpoint.method == "GGUF" and checkpoint.bits is None and "tensor_table" in checkpoint.evidence
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file")
    with pytest.raises(LessonError, match="could not be read as GGUF"):
        checkpoints.describe(broken)


@pytest.mark.parametrize(
    "name, method, bits, activations",
    [
        ("Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4", "GPTQ", 4, False),
        ("Qwen/Qwen2.5-7B-Instruct-GPTQ-Int8", "GPTQ", 8, False),
        ("TheBloke/Llama-2-7B-AWQ", "AWQ", None, False),
        ("unsloth/Llama-3.2-1B-Instruct-bnb-4bit", "bitsandbytes NF4", 4, False),
        ("bartowski/Llama-3.2-1B-Instruct-GGUF", "GGUF", None, False),
        ("RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8-dynamic", "FP8", 8, True),
        ("RedHatAI/Meta-Llama-3.1-8B-Instruct-quantized.w4a16", "compressed-tensors W4A16", 4, False),
        ("RedHatAI/Meta-Llama-3.1-8B-Instruct-quantized.w8a8", "compressed-tensors W8A8", 8, True),
        ("nvidia/Llama-3.3-70B-Instruct-NVFP4", "NVFP4", 4, True),
        ("RedHatAI/Qwen3-8B-NVFP4A16", "NVFP4", 4, False),
        ("openai/gpt-oss-20b", "MXFP4", 4, False),
        ("turboderp/Llama-3.1-8B-Instruct-exl2:4.0bpw", "EXL2", 4.0, False),
        ("turboderp/Mistral-7B-instruct-exl2@6.5bpw", "EXL2", 6.5, False),
    ],
)
def test_names_follow_their_uploaders_conventions(name, method, bits, activations):
    checkpoint = checkpoints.describe(name)
    assert (checkpoint.method, checkpoint.bits, checkpoint.activations_quantized) == (method, bits, activations)
    assert checkpoint.evidence.startswith("from the name only")


def test_gguf_names_give_the_type_and_group_sizes_come_from_names():
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    checkpoint = checkpoints.describe("bartowski/Llama-3.2-1B-Instruct-Q4_K_M.gguf")
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_K]
    assert checkpoint.bits == pytest.approx(8 * type_size / block_size) and "Q4_K_M" in checkpoint.evidence
    assert "general.file_type" in checkpoint.evidence  # a GGUF's authority is its metadata, not config.json
    assert checkpoints.describe("TheBloke/Llama-2-7B-GPTQ:gptq-4bit-32g-actorder_True").group_size == 32
    assert checkpoints.describe("TheBloke/Llama-2-7B-GPTQ").group_size is None


def test_an_unrecognised_name_says_what_to_check():
    checkpoint = checkpoints.describe("meta-llama/Llama-3.1-8B")
    assert checkpoint.method == "unknown" and checkpoint.bits is None
    assert "quantization_config" in checkpoint.evidence and "config.json" in checkpoint.evidence


@pytest.mark.parametrize("missing", ["./no-such-model", "/no/such/model", "~/no-such-model-here", "a/b/c.gguf"])
def test_a_missing_path_is_an_error(missing):
    with pytest.raises(LessonError, match="does not exist"):
        checkpoints.describe(missing)


def test_a_missing_path_object_and_unusable_folders_are_errors(tmp_path):
    with pytest.raises(LessonError, match="does not exist"):
        checkpoints.describe(tmp_path / "nothing")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "model-Q4_0.gguf").write_bytes(b"")
    with pytest.raises(LessonError, match="no config.json.*model-Q4_0.gguf"):
        checkpoints.describe(empty)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(LessonError, match="not a .gguf"):
        checkpoints.describe(tmp_path / "weights.bin")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(LessonError, match="could not be read as JSON"):
        checkpoints.describe(broken)


def _checkpoint(method: str, activations: bool = False) -> checkpoints.Checkpoint:
    return checkpoints.Checkpoint("m", method, 4.0, None, activations, "test")


@pytest.mark.parametrize(
    "method, activations, capability, expected",
    [
        ("FP8", True, (8, 9), True), ("FP8", True, (9, 0), True), ("FP8", True, (8, 0), False),
        ("FP8", False, (8, 0), True), ("FP8", False, (7, 0), False),
        ("NVFP4", True, (10, 0), True), ("NVFP4", True, (9, 0), False), ("MXFP4", True, (12, 0), True),
        ("NVFP4", False, (9, 0), True), ("MXFP4", False, (8, 0), True), ("MXFP4", False, (7, 5), False),
        ("GPTQ", False, (7, 5), True), ("AWQ", False, (8, 0), True), ("GPTQ", False, (7, 0), False),
        ("compressed-tensors W4A16", False, (9, 0), True),
        ("bitsandbytes NF4", False, (6, 1), True), ("bitsandbytes NF4", False, (5, 2), False),
        ("bitsandbytes int8", True, (7, 5), True), ("bitsandbytes int8", True, (7, 0), False),
        ("EXL2", False, (6, 1), True), ("EXL3", False, (7, 5), False), ("EXL3", False, (8, 6), True),
        ("GGUF", False, (5, 0), True), ("unquantized", False, (7, 0), True), ("unquantized", False, (8, 0), True),
    ],
)  # fmt: skip
def test_capability_decisions(method, activations, capability, expected):
    ok, reason = checkpoints.runs_here(_checkpoint(method, activations), capability)
    assert ok is expected
    assert f"{capability[0]}.{capability[1]}" in reason and method in reason


def test_reasons_say_what_happens_instead():
    _, fp8 = checkpoints.runs_here(_checkpoint("FP8", True), (8, 0))
    assert "8.9" in fp8 and "weights only" in fp8
    _, fp4 = checkpoints.runs_here(_checkpoint("NVFP4", True), (9, 0))
    assert "10.0" in fp4 and "weights only" in fp4
    _, marlin = checkpoints.runs_here(_checkpoint("GPTQ"), (7, 5))
    assert "Marlin" in marlin and "8.0" in marlin  # older releases needed 8.0
    _, bf16 = checkpoints.runs_here(_checkpoint("unquantized"), (7, 0))
    assert "float16" in bf16 and "8.0" in bf16


@pytest.mark.parametrize("method, activations, expected", [
    ("GGUF", False, True), ("bitsandbytes NF4", False, True), ("bitsandbytes int8", True, True),
    ("unquantized", False, True), ("EXL2", False, False), ("GPTQ", False, False), ("FP8", True, False),
    ("NVFP4", True, False),
])  # fmt: skip
def test_without_an_nvidia_gpu(method, activations, expected):
    ok, reason = checkpoints.runs_here(_checkpoint(method, activations), None)
    assert ok is expected and reason.startswith("No NVIDIA GPU")
    if not expected:
        assert "GGUF" in reason  # says what to use on a CPU instead


def test_unknown_methods_and_bad_capabilities():
    ok, reason = checkpoints.runs_here(checkpoints.describe("meta-llama/Llama-3.1-8B"), (9, 0))
    assert not ok and "no rule" in reason and "quantization_config" in reason
    for bad in ((9,), "9.0", (9.0, 0), [9, 0]):
        with pytest.raises(LessonError, match="major, minor"):
            checkpoints.runs_here(_checkpoint("GPTQ"), bad)


def test_every_rule_is_reachable_and_names_an_existing_page():
    methods = [("unquantized", False), ("GPTQ", False), ("FP8", True), ("FP8", False), ("NVFP4", True),
               ("MXFP4", False), ("bitsandbytes NF4", False), ("bitsandbytes int8", True), ("GGUF", False),
               ("EXL2", False), ("EXL3", False)]  # fmt: skip
    assert {checkpoints.rule_for(_checkpoint(m, a)) for m, a in methods} == set(checkpoints.RULES)
    source = Path(checkpoints.__file__).read_text()
    table = source[source.index("RULES: dict"):source.index("}  # fmt: skip", source.index("RULES: dict"))]
    entries = re.findall(r"^    # (.+)\n    \"([^\"]+)\": Rule\(", table, flags=re.MULTILINE)
    assert {key for _, key in entries} == set(checkpoints.RULES)  # every rule has a comment right above it
    root = Path(__file__).resolve().parents[1]
    for comment, key in entries:
        pages = re.findall(r"content/[\w.-]+\.md", comment)
        assert pages and all((root / page).is_file() for page in pages), (key, comment)
