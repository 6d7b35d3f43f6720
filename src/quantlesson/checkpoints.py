"""Recognise a checkpoint that ships already quantized, and say whether it runs fast here.

:func:`describe` takes a Hugging Face Hub name (``"Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4"``), a local
model folder with a ``config.json``, or a ``.gguf`` file, and returns a :class:`Checkpoint`: the
method, the bits, the group size, whether activations are quantized too, and where each of these
came from. A folder's ``config.json`` is the authority (its ``quantization_config`` is what
transformers, vLLM and llm-compressor read); a name is only a convention of whoever uploaded it.

:func:`runs_here` answers, for a GPU's compute capability (``models.gpu_capability()``), whether the
format has a fast kernel there, and why. Its rules are the ones the lesson's pages state, in
:data:`RULES`, each with the page it comes from.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from quantlesson.errors import LessonError

UNKNOWN = "unknown"
CHECK_GGUF = "the file's general.file_type is the authority: download the .gguf and pass its path"
CHECK_CONFIG = ("check the checkpoint's config.json: its quantization_config says the method "
                "(download it with huggingface_hub.hf_hub_download(repo, 'config.json') and pass its folder)")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """What a quantized checkpoint stores.

    ``bits`` is the width of the stored weight codes as the checkpoint declares it (4 for GPTQ-Int4,
    8 for FP8); for GGUF and EXL2 it is the average bits per weight of the file type or target.
    ``group_size`` is the number of weights that share one scale (``None``: per channel, per tensor,
    per block, or not known). ``evidence`` says where each field came from.
    """

    name: str
    method: str
    bits: float | None
    group_size: int | None
    activations_quantized: bool
    evidence: str

    def __str__(self) -> str:
        bits = "?" if self.bits is None else f"{self.bits:g}"
        group = f", groups of {self.group_size}" if self.group_size else ""
        activations = ", activations quantized too" if self.activations_quantized else ""
        return f"{self.name}: {self.method}, {bits} bits{group}{activations} ({self.evidence})"


# ---------------------------------------------------------------------------------------------
# Where each format runs fast: the lesson's own rules, one row per kind of kernel.
# ---------------------------------------------------------------------------------------------

ANY_GPU = (0, 0)  # any NVIDIA GPU


@dataclasses.dataclass(frozen=True)
class Rule:
    """What runs a format fast, from which compute capability, and what happens elsewhere.

    ``older`` says what happens on an older GPU; ``older_is_fast`` whether that still counts as
    running natively. ``cpu`` says how it runs without an NVIDIA GPU (``None``: not usefully).
    """

    kernel: str
    needs: tuple[int, int]
    older: str
    older_is_fast: bool
    cpu: str | None
    note: str = ""


RULES: dict[str, Rule] = {
    # content/09-hpc.md ("bfloat16 arithmetic" row: V100 no, A100 and newer yes)
    "unquantized": Rule(
        "bfloat16 arithmetic", (8, 0),
        "it runs in float16 instead (a model trained in bfloat16 can overflow there)", True,
        "PyTorch runs it on a CPU in float32 or bfloat16, slowly for a large model"),
    # content/08-which-method.md (vLLM row), content/03-gptq.md and content/09-hpc.md (Marlin row)
    "integer weights, 16-bit activations": Rule(
        "Marlin kernels (vLLM, GPTQModel)", (7, 5),
        "only slower paths remain (GPTQ through GPTQModel's Triton or ExLlama kernels)", False,
        None, note=" in recent vLLM and GPTQModel (older releases: 8.0)"),
    # content/07b-formats-2026.md ("Which hardware runs what") and content/09-hpc.md (FP8 W8A8 row)
    "FP8 weights and activations": Rule(
        "FP8 tensor cores (W8A8 in vLLM, TensorRT-LLM)", (8, 9),
        "vLLM runs the FP8 weights only, through Marlin from 7.5, with 16-bit arithmetic", False,
        None),
    # content/09-hpc.md (vLLM's FP8 page: weight-only FP8 Marlin from 7.5)
    "FP8 weights only": Rule(
        "FP8 Marlin kernels in vLLM (weight-only)", (7, 5),
        "no FP8 kernel: the weights are expanded to 16 bits", False,
        None),
    # content/07b-formats-2026.md ("Which hardware runs what": MXFP4, NVFP4 W4A4 on Blackwell, 10.0)
    "FP4 weights and activations": Rule(
        "FP4 tensor cores (W4A4, Blackwell)", (10, 0),
        "vLLM runs the FP4 weights only (W4A16), without activation quantization", False,
        None),
    # content/08-which-method.md (vLLM row: "weight-only (W4A16) on Ampere and Hopper")
    "FP4 weights only": Rule(
        "vLLM's weight-only FP4 kernels (Ampere, Hopper, Blackwell)", (8, 0),
        "no FP4 kernel: the weights are expanded to 16 bits", False,
        None),
    # content/09-hpc.md (bitsandbytes row: NF4 from 6.0) and content/05-bitsandbytes.md (CPU)
    "bitsandbytes 4-bit": Rule(
        "bitsandbytes' CUDA kernels", (6, 0),
        "bitsandbytes' 4-bit kernels need compute capability 6.0", False,
        "recent bitsandbytes runs NF4 and FP4 on CPUs too (0.50.2 does), more slowly"),
    # content/09-hpc.md (bitsandbytes row: LLM.int8() from 7.5) and content/05-bitsandbytes.md (CPU)
    "bitsandbytes int8": Rule(
        "bitsandbytes' LLM.int8() CUDA kernels", (7, 5),
        "LLM.int8() needs compute capability 7.5", False,
        "recent bitsandbytes runs LLM.int8() on CPUs too (0.50.2 does), more slowly"),
    # content/08-which-method.md (llama.cpp row: fast on CPU, CUDA, HIP, Metal, Vulkan)
    "GGUF": Rule(
        "llama.cpp's CUDA build", ANY_GPU, "", True,
        "llama.cpp: the format made for CPUs"),
    # content/07-exl2.md ("Only NVIDIA GPUs in practice")
    "EXL2": Rule(
        "ExLlamaV2's CUDA kernels", ANY_GPU, "", True,
        None),
    # content/api.md (models.require_capability("EXL3"): Ampere, 8.0, or newer)
    "EXL3": Rule(
        "ExLlamaV3's CUDA kernels", (8, 0),
        "ExLlamaV3 needs compute capability 8.0", False,
        None),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# describe(): from a local folder or file, else from the name
# ---------------------------------------------------------------------------------------------


def describe(source: str | Path) -> Checkpoint:
    """What a checkpoint is: a local model folder (its ``config.json``), a ``.gguf`` file, or a Hub name.

    A ``Path``, or text that looks like a path (``./x``, ``/x``, ``~/x``, ``a/b/c``), must exist.
    A name is read by its uploader's convention, and an unrecognised one gives method ``"unknown"``
    with evidence that says what to check.
    """
    text = str(source)
    local = Path(text).expanduser()
    if local.exists():
        return _describe_local(local)
    if isinstance(source, Path) or _looks_like_path(text):
        raise LessonError(
            f"{text} does not exist. Check the path; to describe a checkpoint on the Hugging Face Hub, "
            "pass its name as 'owner/name' (one slash), e.g. 'Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4'."
        )
    return from_name(text)


def _looks_like_path(text: str) -> bool:
    """The same rule as ``models.locate``: a Hub name has at most one slash and no leading ``.``, ``/`` or ``~``."""
    return text.startswith((".", "/", "~")) or text.count("/") > 1


def _describe_local(path: Path) -> Checkpoint:
    """A ``.gguf`` file, or a folder with a ``config.json``."""
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise LessonError(f"{path} is a file but not a .gguf: pass a .gguf file or the folder that holds config.json.")
        return from_gguf(path)
    config = path / "config.json"
    if not config.is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f" It holds {', '.join(ggufs)}: pass one of those files." if ggufs else ""
        raise LessonError(f"{path} holds no config.json: pass a saved model folder or a .gguf file.{hint}")
    return from_config(path.name, _read_json(config), modelopt=_read_optional_json(path / "hf_quant_config.json"))


def _read_json(path: Path) -> dict:
    """A JSON object from a file, or a LessonError that names the file."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LessonError(f"{path} could not be read as JSON ({error}): download or save it again.") from error
    if not isinstance(value, dict):
        raise LessonError(f"{path} holds {type(value).__name__}, not a JSON object: download or save it again.")
    return value


def _read_optional_json(path: Path) -> dict | None:
    """:func:`_read_json` where the file exists, else ``None``."""
    return _read_json(path) if path.is_file() else None


# ---------------------------------------------------------------------------------------------
# config.json: quantization_config, key names as transformers, compressed-tensors, ExLlamaV2 and
# NVIDIA's Model Optimizer write them.
# ---------------------------------------------------------------------------------------------


def from_config(name: str, config: dict, modelopt: dict | None = None) -> Checkpoint:
    """Describe a checkpoint from its ``config.json`` (and NVIDIA Model Optimizer's ``hf_quant_config.json``, if any)."""
    quantization = config.get("quantization_config")
    if quantization is None and modelopt and isinstance(modelopt.get("quantization"), dict):
        return _modelopt(name, modelopt["quantization"], "hf_quant_config.json's quantization")
    if quantization is None:
        return _no_quantization_config(name, config)
    if not isinstance(quantization, dict):
        raise LessonError(f"{name}: config.json's quantization_config is not an object: download config.json again.")
    if quantization.get("load_in_4bit") or quantization.get("load_in_8bit"):
        return _bitsandbytes(name, quantization)  # transformers reads these two keys before quant_method
    method = str(quantization.get("quant_method", "")).lower()
    reader = _CONFIG_READERS.get(method)
    if reader is None:
        return Checkpoint(name, UNKNOWN, None, None, False,
                          f"config.json's quantization_config has quant_method {method or 'missing'!r}, which this "
                          f"module does not read: see transformers' quantization overview for it")  # fmt: skip
    return reader(name, quantization)


def _no_quantization_config(name: str, config: dict) -> Checkpoint:
    """No quantization_config: unquantized, unless the name says EXL2 (its converter does not always write one)."""
    by_name = from_name(name)
    if by_name.method == "EXL2":
        return dataclasses.replace(by_name, evidence=f"config.json has no quantization_config; {by_name.evidence}")
    dtype = config.get("dtype") or config.get("torch_dtype")
    bits = {"float32": 32.0, "float16": 16.0, "bfloat16": 16.0}.get(str(dtype))
    return Checkpoint(name, "unquantized", bits, None, False,
                      f"config.json has no quantization_config; its dtype is {dtype!r}")  # fmt: skip


def _group(value) -> int | None:
    """A group size as checkpoints store it: -1 or 0 or missing mean one scale per output channel."""
    return int(value) if value not in (None, -1, 0) else None


def _gptq(name: str, q: dict) -> Checkpoint:
    """GPTQ (``GPTQConfig``: bits, group_size, desc_act, sym; GPTQModel adds checkpoint_format)."""
    extras = ", ".join(f"{key} {q[key]!r}" for key in ("desc_act", "sym", "checkpoint_format") if key in q)
    return Checkpoint(name, "GPTQ", _number(q.get("bits")), _group(q.get("group_size")), False,
                      f"config.json quantization_config: quant_method 'gptq', bits {q.get('bits')!r}, "
                      f"group_size {q.get('group_size')!r}{', ' + extras if extras else ''}")  # fmt: skip


def _awq(name: str, q: dict) -> Checkpoint:
    """AWQ (``AwqConfig``: bits, group_size, zero_point, version; AutoAWQ's own names w_bit, q_group_size)."""
    bits_key = "bits" if "bits" in q else "w_bit"
    group_key = "group_size" if "group_size" in q else "q_group_size"
    return Checkpoint(name, "AWQ", _number(q.get(bits_key)), _group(q.get(group_key)), False,
                      f"config.json quantization_config: quant_method 'awq', {bits_key} {q.get(bits_key)!r}, "
                      f"{group_key} {q.get(group_key)!r}, version {q.get('version')!r}")  # fmt: skip


def _bitsandbytes(name: str, q: dict) -> Checkpoint:
    """bitsandbytes (``BitsAndBytesConfig``: load_in_4bit with bnb_4bit_quant_type, or load_in_8bit)."""
    if not (q.get("load_in_4bit") or q.get("load_in_8bit")):
        return Checkpoint(name, UNKNOWN, None, None, False,
                          "config.json quantization_config: quant_method 'bitsandbytes' but neither load_in_4bit nor "
                          "load_in_8bit is true: save the model again with its BitsAndBytesConfig")  # fmt: skip
    if q.get("load_in_8bit"):
        return Checkpoint(name, "bitsandbytes int8", 8.0, None, True,
                          "config.json quantization_config: load_in_8bit true (LLM.int8(): one scale per row, "
                          f"activations in int8 too, outlier columns above llm_int8_threshold "
                          f"{q.get('llm_int8_threshold', 6.0)!r} kept in 16 bits)")  # fmt: skip
    kind = str(q.get("bnb_4bit_quant_type", "fp4")).lower()  # transformers' default is fp4
    return Checkpoint(name, f"bitsandbytes {kind.upper()}", 4.0, 64, False,
                      f"config.json quantization_config: load_in_4bit true, bnb_4bit_quant_type {kind!r}, "
                      f"bnb_4bit_use_double_quant {q.get('bnb_4bit_use_double_quant', False)!r}; groups of 64 are "
                      "bitsandbytes' default block size (not written to config.json)")  # fmt: skip


def _exl2(name: str, q: dict) -> Checkpoint:
    """EXL2 (ExLlamaV2's converter writes quant_method, version, bits, head_bits, calibration)."""
    return Checkpoint(name, "EXL2", _number(q.get("bits")), None, False,
                      f"config.json quantization_config: quant_method 'exl2', bits {q.get('bits')!r} per weight on "
                      f"average, head_bits {q.get('head_bits')!r}, calibration {q.get('calibration')!r}")  # fmt: skip


def _exl3(name: str, q: dict) -> Checkpoint:
    """EXL3 (ExLlamaV3's converter: quant_method 'exl3' with bits)."""
    return Checkpoint(name, "EXL3", _number(q.get("bits")), None, False,
                      f"config.json quantization_config: quant_method 'exl3', bits {q.get('bits')!r} per weight")  # fmt: skip


def _fp8(name: str, q: dict) -> Checkpoint:
    """transformers' fine-grained FP8 (DeepSeek-V3, Qwen3-FP8: activation_scheme, weight_block_size) and fbgemm_fp8."""
    method = q.get("quant_method")
    scheme = q.get("activation_scheme", "dynamic per token" if method == "fbgemm_fp8" else None)
    return Checkpoint(name, "FP8", 8.0, None, scheme is not None,
                      f"config.json quantization_config: quant_method {method!r}, activation_scheme {scheme!r}, "
                      f"weight_block_size {q.get('weight_block_size')!r} (one scale per block)")  # fmt: skip


def _mxfp4(name: str, q: dict) -> Checkpoint:
    """MXFP4 as gpt-oss ships it (``Mxfp4Config``: quant_method, modules_to_not_convert): weights only."""
    return Checkpoint(name, "MXFP4", 4.0, 32, False,
                      "config.json quantization_config: quant_method 'mxfp4' (E2M1 codes, one power-of-two scale per "
                      f"32 weights by the format's definition); modules_to_not_convert {q.get('modules_to_not_convert')!r} "
                      "stay in 16 bits; activations are not quantized")  # fmt: skip


# Model Optimizer's quant_algo values that vLLM documents (docs/features/quantization/modelopt.md).
_MODELOPT = {
    "NVFP4": ("NVFP4", 4.0, 16, True),
    "FP8": ("FP8", 8.0, None, True),
    "FP8_PER_CHANNEL_PER_TOKEN": ("FP8", 8.0, None, True),
    "FP8_PB_WO": ("FP8", 8.0, None, False),
}


def _modelopt(name: str, q: dict, where: str = "config.json quantization_config") -> Checkpoint:
    """NVIDIA Model Optimizer (quant_method 'modelopt' with quant_algo; older exports: hf_quant_config.json)."""
    algo = str(q.get("quant_algo", "")).upper()
    if algo not in _MODELOPT:
        return Checkpoint(name, UNKNOWN, None, None, False,
                          f"{where}: Model Optimizer quant_algo {algo or 'missing'!r}, which this module does not read")  # fmt: skip
    method, bits, group, activations = _MODELOPT[algo]
    group = _group(q.get("group_size")) or group
    return Checkpoint(name, method, bits, group, activations,
                      f"{where}: NVIDIA Model Optimizer, quant_algo {algo!r}, group_size {q.get('group_size')!r}")  # fmt: skip


def _compressed_tensors(name: str, q: dict) -> Checkpoint:
    """llm-compressor's compressed-tensors: config_groups -> weights / input_activations, and format."""
    groups = q.get("config_groups") or {}
    schemes = [g for g in groups.values() if isinstance(g, dict) and isinstance(g.get("weights"), dict)]
    if not schemes:
        return Checkpoint(name, UNKNOWN, None, None, False,
                          "config.json quantization_config: compressed-tensors without quantized weights in "
                          "config_groups (sparsity or a transform only?)")  # fmt: skip
    scheme = schemes[0]
    weights, activations = scheme["weights"], scheme.get("input_activations")
    layout = scheme.get("format") or q.get("format")
    method = _compressed_tensors_method(weights, activations, layout)
    more = f"; {len(schemes)} config groups, the first described" if len(schemes) > 1 else ""
    return Checkpoint(name, method, _number(weights.get("num_bits")), _group(weights.get("group_size")),
                      activations is not None,
                      f"config.json quantization_config: compressed-tensors, format {layout!r}, weights "
                      f"{weights.get('num_bits')!r}-bit {weights.get('type')!r} strategy {weights.get('strategy')!r} "
                      f"group_size {weights.get('group_size')!r}, input_activations "
                      f"{_activation_text(activations)}{more}")  # fmt: skip


def _compressed_tensors_method(weights: dict, activations: dict | None, layout: str | None) -> str:
    """The lesson's name for a compressed-tensors scheme (FP8, NVFP4, MXFP4, or W<bits>A<bits>)."""
    bits, kind = weights.get("num_bits"), weights.get("type", "int")
    if kind == "float" and bits == 8:
        return "FP8"
    if kind == "float" and bits == 4:
        if layout == "mxfp4-pack-quantized" or weights.get("group_size") == 32:
            return "MXFP4"
        return "NVFP4"  # nvfp4-pack-quantized, groups of 16 under a global scale
    if activations is None:
        return f"compressed-tensors W{bits}A16"
    suffix = "FP8" if activations.get("type") == "float" else str(activations.get("num_bits"))
    return f"compressed-tensors W{bits}A{suffix}"


def _activation_text(activations: dict | None) -> str:
    """How a compressed-tensors scheme quantizes activations, in a few words."""
    if activations is None:
        return "none (16-bit)"
    return (f"{activations.get('num_bits')!r}-bit {activations.get('type')!r} strategy {activations.get('strategy')!r}"
            f" dynamic {activations.get('dynamic')!r}")  # fmt: skip


def _number(value) -> float | None:
    """A bit width as a float, or None where the config has none."""
    return None if value is None else float(value)


_CONFIG_READERS = {
    "gptq": _gptq,
    "awq": _awq,
    "bitsandbytes": _bitsandbytes,
    "compressed-tensors": _compressed_tensors,
    "fp8": _fp8,
    "fbgemm_fp8": _fp8,
    "mxfp4": _mxfp4,
    "modelopt": _modelopt,
    "exl2": _exl2,
    "exl3": _exl3,
}


# ---------------------------------------------------------------------------------------------
# GGUF: general.file_type, a gguf.LlamaFileType
# ---------------------------------------------------------------------------------------------

# Where llama.cpp's default block type for a file type is not the file type's name minus its
# _S/_M/_L size suffix (src/llama-quant.cpp, the switch over LLAMA_FTYPE_MOSTLY_*).
_GGUF_BLOCK_EXCEPTIONS = {"IQ3_XS": "IQ3_S", "IQ3_M": "IQ3_S", "IQ2_S": "IQ2_XS", "IQ2_M": "IQ2_S",
                          "MXFP4_MOE": "MXFP4", "Q2_K_S": "Q2_K"}  # fmt: skip


def from_gguf(path: str | Path) -> Checkpoint:
    """Describe a ``.gguf`` file from its ``general.file_type`` (read with the ``gguf`` package)."""
    from gguf import GGUFReader, Keys

    path = Path(path)
    try:
        reader = GGUFReader(str(path))
    except (OSError, ValueError, IndexError) as error:
        raise LessonError(f"{path} could not be read as GGUF ({error}): download it again.") from error
    field = reader.get_field(Keys.General.FILE_TYPE)
    if field is None:
        return Checkpoint(path.name, "GGUF", None, None, False,
                          "the file has no general.file_type: list its tensor types with quantlesson.llamacpp.tensor_table")  # fmt: skip
    code = int(field.contents())
    type_name = gguf_type_name(code)
    bits, block = gguf_block_bits(type_name)
    return Checkpoint(path.name, "GGUF", bits, None, False,
                      f"general.file_type {code} = {type_name}; {_gguf_bits_text(type_name, bits, block)}")  # fmt: skip


def gguf_type_name(code: int) -> str:
    """llama.cpp's name for a ``general.file_type`` value: 15 -> ``"Q4_K_M"`` (``gguf.LlamaFileType``)."""
    from gguf import LlamaFileType

    try:
        member = LlamaFileType(code)
    except ValueError:
        raise LessonError(f"general.file_type {code} is not a type this gguf package knows: upgrade gguf.") from None
    return member.name.removeprefix("MOSTLY_").removeprefix("ALL_")


def gguf_block_bits(type_name: str) -> tuple[float | None, str | None]:
    """Bits per weight of the block type a llama.cpp file type is mostly made of, from ``gguf.GGML_QUANT_SIZES``.

    ``"Q4_K_M"`` -> ``(4.5, "Q4_K")``. A K-quant mix (``_M``, ``_L``) keeps some tensors in a wider
    type, so the whole file has somewhat more bits per weight.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    candidates = [_GGUF_BLOCK_EXCEPTIONS.get(type_name, type_name), re.sub(r"_(XS|S|M|L)$", "", type_name)]
    for candidate in candidates:
        if candidate in GGMLQuantizationType.__members__:
            block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[candidate]]
            return 8 * type_size / block_size, candidate
    return None, None


def _gguf_bits_text(type_name: str, bits: float | None, block: str | None) -> str:
    """Where a GGUF's bits come from, in words."""
    if bits is None:
        return f"no block size known for {type_name}"
    if block == type_name:
        return f"{bits:g} bits per weight in {block} blocks"
    return (f"mostly {block} blocks of {bits:g} bits per weight; the {type_name} mix keeps some tensors wider "
            "(quantlesson.llamacpp.bits_per_weight measures a file)")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Names: the conventions of the people who upload quantized checkpoints
# ---------------------------------------------------------------------------------------------

# (pattern searched in the lower-cased name, method, activations quantized, whose convention)
NAME_CONVENTIONS: tuple[tuple[str, str, bool, str], ...] = (
    (r"gguf", "GGUF", False, "a .gguf file or a -GGUF repository (llama.cpp)"),
    (r"exl2", "EXL2", False, "an -exl2 repository (ExLlamaV2), one branch per target such as 4.0bpw"),
    (r"exl3", "EXL3", False, "an -exl3 repository (ExLlamaV3)"),
    (r"nvfp4a16", "NVFP4", False, "llm-compressor's NVFP4A16 scheme: FP4 weights, 16-bit activations"),
    (r"nvfp4", "NVFP4", True, "an -NVFP4 checkpoint (NVIDIA Model Optimizer, llm-compressor): FP4 weights and activations"),
    (r"mxfp4a16", "MXFP4", False, "llm-compressor's MXFP4A16 scheme: FP4 weights, 16-bit activations"),
    (r"mxfp4", "MXFP4", True, "an -MXFP4 checkpoint (llm-compressor's MXFP4 scheme: weights and activations)"),
    (r"fp8", "FP8", True, "an -FP8 or -FP8-dynamic checkpoint (W8A8: FP8 weights and activations)"),
    (r"w(\d)a16", "compressed-tensors W{0}A16", False, "a quantized.w<bits>a16 checkpoint (llm-compressor)"),
    (r"w8a8", "compressed-tensors W8A8", True, "a quantized.w8a8 checkpoint (llm-compressor, INT8 weights and activations)"),
    (r"gptq", "GPTQ", False, "a -GPTQ checkpoint"),
    (r"awq", "AWQ", False, "an -AWQ checkpoint"),
    (r"bnb[-_]?4bit", "bitsandbytes NF4", False, "a -bnb-4bit checkpoint (Unsloth's convention: NF4)"),
    (r"bnb[-_]?(8bit|int8)", "bitsandbytes int8", True, "a -bnb-8bit checkpoint (LLM.int8())"),
    (r"gpt-oss", "MXFP4", False, "openai/gpt-oss: its MoE experts in MXFP4, weights only (its config.json: quant_method 'mxfp4')"),
)  # fmt: skip


def from_name(name: str) -> Checkpoint:
    """Describe a checkpoint from its name alone, by the uploaders' conventions (:data:`NAME_CONVENTIONS`)."""
    lowered = name.lower()
    for pattern, method, activations, convention in NAME_CONVENTIONS:
        found = re.search(pattern, lowered)
        if found:
            method = method.format(*found.groups())
            bits, bits_text = _bits_from_name(name, method)
            group = _group_from_name(lowered, method)
            authority = CHECK_GGUF if method == "GGUF" else CHECK_CONFIG
            return Checkpoint(name, method, bits, group, activations,
                              f"from the name only: {convention}; {bits_text}; a name is a convention, not a "
                              f"guarantee: {authority}")  # fmt: skip
    return Checkpoint(name, UNKNOWN, None, None, False,
                      f"the name follows no quantized-checkpoint convention this module knows (it may be "
                      f"unquantized); {CHECK_CONFIG}")  # fmt: skip


# Bits a format fixes by definition, whatever the name says.
_FIXED_BITS = {"FP8": 8.0, "NVFP4": 4.0, "MXFP4": 4.0, "bitsandbytes NF4": 4.0, "bitsandbytes int8": 8.0}
# Group sizes a format fixes by definition (MXFP4: 32 weights per scale, NVFP4: 16; bitsandbytes' default 64).
_FIXED_GROUPS = {"NVFP4": 16, "MXFP4": 32, "bitsandbytes NF4": 64}


def _bits_from_name(name: str, method: str) -> tuple[float | None, str]:
    """The bits a name states (Int4, 4bit, 4.0bpw, w4a16, a GGUF type), and how they were found."""
    if method in _FIXED_BITS:
        return _FIXED_BITS[method], f"{_FIXED_BITS[method]:g} bits by the format's definition"
    if method == "GGUF":
        return _gguf_bits_from_name(name)
    lowered = name.lower()
    patterns = (r"(\d+(?:\.\d+)?)\s*bpw", r"(?<![a-z0-9])w(\d)a\d+", r"int(\d+)(?![0-9])", r"(?<![0-9.])(\d+)[-_]?bits?(?![a-z])")
    for pattern in patterns:
        found = re.search(pattern, lowered)
        if found:
            return float(found.group(1)), f"{float(found.group(1)):g} bits from '{found.group(0)}' in the name"
    return None, "the name states no bits"


def _gguf_bits_from_name(name: str) -> tuple[float | None, str]:
    """A llama.cpp type named in a GGUF name (``-Q4_K_M.gguf``) and the bits of its main block type."""
    from gguf import LlamaFileType

    types = sorted((m.name.removeprefix("MOSTLY_").removeprefix("ALL_") for m in LlamaFileType), key=len, reverse=True)
    for type_name in types:
        if re.search(rf"(?<![A-Z0-9]){re.escape(type_name)}(?![A-Z0-9])", name.upper()):
            bits, block = gguf_block_bits(type_name)
            return bits, f"type {type_name} in the name; {_gguf_bits_text(type_name, bits, block)}"
    return None, "the name names no llama.cpp type (Q4_K_M, Q8_0, ...): look at the file names in the repository"


def _group_from_name(lowered: str, method: str) -> int | None:
    """A group size from a name (``-128g``, ``gs32``), or the one a format fixes by definition."""
    if method in _FIXED_GROUPS:
        return _FIXED_GROUPS[method]
    found = re.search(r"(?<![a-z0-9])(?:g|gs)(\d{2,3})(?![0-9])|(?<![a-z0-9])(\d{2,3})g(?![a-z0-9])", lowered)
    return int(found.group(1) or found.group(2)) if found else None


# ---------------------------------------------------------------------------------------------
# runs_here()
# ---------------------------------------------------------------------------------------------


def rule_for(checkpoint: Checkpoint) -> str | None:
    """The key of :data:`RULES` that applies to a checkpoint, or ``None`` where the lesson states no rule."""
    method = checkpoint.method
    if method in ("GPTQ", "AWQ") or re.fullmatch(r"compressed-tensors W\d+A16", method):
        return "integer weights, 16-bit activations"
    if method == "FP8":
        return "FP8 weights and activations" if checkpoint.activations_quantized else "FP8 weights only"
    if method in ("NVFP4", "MXFP4"):
        return "FP4 weights and activations" if checkpoint.activations_quantized else "FP4 weights only"
    if method in ("bitsandbytes NF4", "bitsandbytes FP4"):
        return "bitsandbytes 4-bit"
    return method if method in RULES else None


def runs_here(checkpoint: Checkpoint, capability: tuple[int, int] | None) -> tuple[bool, str]:
    """Whether the checkpoint runs natively, with fast kernels, on a GPU of this compute capability, and why.

    ``capability`` is ``models.gpu_capability()``: ``(9, 0)`` for an H100, ``None`` without an NVIDIA GPU
    (then the question is whether it runs usefully on the CPU).
    """
    _check_capability(capability)
    key = rule_for(checkpoint)
    if key is None:
        return False, (f"The lesson has no rule for {checkpoint.method!r}: check the runtime's support table "
                       f"(vLLM's quantization hardware table) before counting on it. Evidence: {checkpoint.evidence}.")  # fmt: skip
    rule = RULES[key]
    if capability is None:
        return _on_cpu(checkpoint.method, rule)
    return _on_gpu(checkpoint.method, rule, capability)


def _check_capability(capability) -> None:
    """Refuse anything but ``None`` or a ``(major, minor)`` pair of integers."""
    ok = capability is None or (
        isinstance(capability, tuple) and len(capability) == 2 and all(isinstance(n, int) for n in capability)
    )
    if not ok:
        raise LessonError(
            f"capability={capability!r}: pass (major, minor), e.g. (8, 0) for an A100, as models.gpu_capability() "
            "returns it, or None on a machine without an NVIDIA GPU."
        )


def _on_cpu(method: str, rule: Rule) -> tuple[bool, str]:
    """The answer without an NVIDIA GPU."""
    if rule.cpu is not None:
        return True, f"No NVIDIA GPU: {method} still runs: {rule.cpu}."
    return False, (f"No NVIDIA GPU: {method} needs {rule.kernel}. On a CPU use a GGUF of the model with llama.cpp "
                   "(converted from the 16-bit original, not from this checkpoint).")  # fmt: skip


def _on_gpu(method: str, rule: Rule, capability: tuple[int, int]) -> tuple[bool, str]:
    """The answer on an NVIDIA GPU of compute capability ``capability``."""
    have = f"{capability[0]}.{capability[1]}"
    if rule.needs == ANY_GPU:
        return True, f"{method} runs with {rule.kernel} on any NVIDIA GPU (this one: {have})."
    need = f"{rule.needs[0]}.{rule.needs[1]}"
    if capability >= rule.needs:
        return True, f"{method} runs with {rule.kernel}, from compute capability {need}{rule.note}; this GPU has {have}."
    return rule.older_is_fast, (f"{method} needs {rule.kernel}, from compute capability {need}{rule.note}; this GPU has "
                                f"{have}: {rule.older}.")  # fmt: skip
