"""A model card for a quantized model: ``README.md`` beside its weights, and the command that uploads both.

The Hugging Face Hub reads the card's YAML front matter: ``base_model`` links the quantized model to
the original, ``tags`` and ``library_name`` let people find it. The body says what was done, with
which settings and calibration data, and what it cost in quality, measured the lesson's way (see
:data:`MEASURED_WITH`). :func:`write_model_card` writes the card to a temporary name and renames it,
so a card that fails to render never replaces a good one.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from quantlesson.errors import LessonError

MEASURED_WITH = (
    "The numbers were measured with the lesson's `quantlesson.evaluate` on held-out text: perplexity, and the "
    "KL divergence and top-1 agreement of every next-token distribution against the unquantized model's, on "
    "the same tokens (`evaluate.compare`). `kld` is in nats per token; `top1` is the fraction of positions where "
    "both models pick the same next token."
)
# The results table shows these columns first, in this order; any others follow.
COLUMN_ORDER = ("method", "bits", "group_size", "bits_per_weight", "size_mb", "perplexity", "kld", "top1")

# One sentence per method of the lesson (the glossary's wording, with the paper where there is one).
METHOD_NOTES = {
    "RTN": "Round-to-nearest: every weight is rounded to the nearest level of its group's grid, without calibration data.",
    "GPTQ": ("GPTQ ([Frantar et al., 2022](https://arxiv.org/abs/2210.17323)) quantizes each layer one column at a "
             "time and updates the columns not yet quantized to compensate for each rounding error, using the inverse "
             "Hessian from calibration data."),
    "AWQ": ("AWQ ([Lin et al., 2023](https://arxiv.org/abs/2306.00978)) finds the input channels with large activations "
            "on calibration data and scales their weight columns up before round-to-nearest group quantization."),
    "bitsandbytes NF4": ("NF4 ([Dettmers et al., 2023](https://arxiv.org/abs/2305.14314)): 16 levels at quantiles of a "
                         "normal distribution, one absmax scale per block of 64 weights; no calibration data."),
    "bitsandbytes int8": ("LLM.int8() ([Dettmers et al., 2022](https://arxiv.org/abs/2208.07339)): int8 weights and "
                          "activations with vector-wise scales; outlier features stay in 16 bits."),
    "GGUF": "llama.cpp's GGUF block formats: small blocks of weights, each with its own scale (and offset or sub-scales).",
    "EXL2": ("ExLlamaV2's EXL2: GPTQ-style rounding with a mix of bit widths per layer, chosen on calibration data to "
             "meet an average bits-per-weight target."),
    "FP8": "FP8 (E4M3) weights with float32 scales.",
    "NVFP4": "NVFP4: 4-bit floats (E2M1), one FP8 (E4M3) scale per 16 weights under one float32 scale per tensor.",
    "MXFP4": "MXFP4 (OCP Microscaling): 4-bit floats (E2M1), one power-of-two scale per 32 weights.",
}  # fmt: skip
# The Hub's library key (huggingface.js, packages/tasks/src/model-libraries.ts) of the library that loads a
# format; transformers for the rest. EXL2 has no key there, so its card names none.
LIBRARY_NAMES = {"GGUF": "llama-cpp-python", "EXL2": None, "EXL3": None}


def write_model_card(
    folder: str | Path, *, base_model: str, method: str, bits: float, group_size: int | None, calibration: str | None,
    results, library_versions: Mapping[str, str],
) -> Path:  # fmt: skip
    """Write ``folder/README.md``: front matter, method and settings, calibration data, results, versions.

    ``results`` is a pandas DataFrame or a list of dicts (columns such as :data:`COLUMN_ORDER`, as
    ``quantlesson.report`` records them); ``library_versions`` maps package to version
    (``quantlesson.versions.installed()``); ``calibration`` describes the calibration data, ``None``
    for a method that uses none. Returns the card's path.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise LessonError(f"{folder} is not a folder: save the quantized model there first (model.save_pretrained(folder)).")
    text = render_model_card(base_model=base_model, method=method, bits=bits, group_size=group_size,
                             calibration=calibration, results=results, library_versions=library_versions)  # fmt: skip
    return _write_atomically(folder / "README.md", text)


def render_model_card(
    *, base_model: str, method: str, bits: float, group_size: int | None, calibration: str | None, results,
    library_versions: Mapping[str, str],
) -> str:  # fmt: skip
    """The card's text (what :func:`write_model_card` writes), after checking every argument."""
    _check_settings(base_model, method, bits, group_size)
    rows = result_rows(results)
    sections = [
        front_matter(base_model, method),
        f"# {base_model}, quantized with {method}\n",
        _description(base_model, method, bits, group_size),
        "## Calibration data\n\n" + (calibration or f"None: {method} as used here needs no calibration data.") + "\n",
        "## Results\n\n" + results_table(rows) + "\n" + MEASURED_WITH + "\n",
        "## Library versions\n\n" + versions_table(library_versions),
    ]
    return "\n".join(sections)


def _check_settings(base_model: str, method: str, bits: float, group_size: int | None) -> None:
    """Refuse settings a card cannot state."""
    for label, value in (("base_model", base_model), ("method", method)):
        if not isinstance(value, str) or not value.strip():
            raise LessonError(f"{label} must be a non-empty string, e.g. base_model='HuggingFaceTB/SmolLM2-135M', method='GPTQ'.")
    if isinstance(bits, bool) or not isinstance(bits, numbers.Real) or not math.isfinite(bits) or bits <= 0:
        raise LessonError(f"bits={bits!r}: give the positive number of bits per weight code (4 for GPTQ-Int4, 4.25 for an EXL2 target).")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0):
        raise LessonError(f"group_size={group_size!r}: give the positive number of weights per scale, or None for one per channel.")


def front_matter(base_model: str, method: str) -> str:
    """The YAML front matter the Hub reads (written by ``huggingface_hub.ModelCardData``), between ``---`` lines."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(base_model=base_model, tags=["quantized", method_tag(method)], library_name=library_name(method))
    return f"---\n{data.to_yaml()}\n---\n"


def method_tag(method: str) -> str:
    """A Hub tag for a method: lower case, words joined by hyphens (``"bitsandbytes NF4"`` -> ``"bitsandbytes-nf4"``)."""
    return "-".join(method.lower().split())


def library_name(method: str) -> str | None:
    """The Hub's ``library_name`` for a checkpoint of this method (see :data:`LIBRARY_NAMES`)."""
    return LIBRARY_NAMES.get(method, "transformers")


def _is_hub_id(name: str) -> bool:
    """Whether ``name`` looks like a Hub repository id (``owner/name``), which the card can link to."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/"))


def _description(base_model: str, method: str, bits: float, group_size: int | None) -> str:
    """The short description: what the method does, and the settings used."""
    note = METHOD_NOTES.get(method, f"{method}: see its documentation for what it stores.")
    groups = f"{group_size} weights per scale" if group_size else "one scale per output channel"
    base = f"[{base_model}](https://huggingface.co/{base_model})" if _is_hub_id(base_model) else f"`{base_model}`"
    return (f"A quantized version of {base}, made with the lesson "
            f"*Quantizing large language models*.\n\n{note}\n\n"
            f"## Settings\n\n| setting | value |\n| --- | --- |\n| method | {_cell(method)} |\n| bits | {_cell(bits)} |\n"
            f"| group size | {groups} |\n")  # fmt: skip


def result_rows(results) -> list[dict]:
    """The rows of ``results`` (a DataFrame or a list of dicts), refusing an empty or malformed table."""
    if hasattr(results, "to_dict") and hasattr(results, "columns"):
        rows = results.to_dict("records")
    elif isinstance(results, (list, tuple)) and all(isinstance(row, Mapping) for row in results):
        rows = [dict(row) for row in results]
    else:
        raise LessonError("results must be a pandas DataFrame or a list of dicts, e.g. [{'method': 'GPTQ', 'kld': 0.01}].")
    if not rows or not any(rows):
        raise LessonError(
            "results is empty: measure the model first (quantlesson.evaluate.compare(model, reference)) and pass its "
            "rows, or the table quantlesson.report.read(...) returns."
        )
    return rows


def results_table(rows: list[dict]) -> str:
    """A Markdown table of result rows: the columns of :data:`COLUMN_ORDER` first, then any others."""
    present = [name for row in rows for name in row]
    columns = [c for c in COLUMN_ORDER if c in present] + list(dict.fromkeys(c for c in present if c not in COLUMN_ORDER))
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    """One table cell: numbers to four significant digits, missing values empty, ``|`` escaped."""
    if _missing(value):
        return ""
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)):
        value = float(value)
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _missing(value) -> bool:
    """None, NaN, or pandas' NA (whose comparisons cannot be turned into a bool)."""
    try:
        return value is None or bool(value != value)
    except (TypeError, ValueError):
        return True


def versions_table(library_versions: Mapping[str, str]) -> str:
    """The library versions as a Markdown table (or a line saying how to record them)."""
    from quantlesson.versions import markdown_table

    if not isinstance(library_versions, Mapping):
        raise LessonError("library_versions must map package names to versions: pass quantlesson.versions.installed().")
    if not library_versions:
        return "Not recorded: pass `quantlesson.versions.installed()` as `library_versions`.\n"
    return markdown_table({str(k): _cell(v) for k, v in library_versions.items()})


def _write_atomically(path: Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    handle, scratch = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(scratch, path)
    except BaseException:
        Path(scratch).unlink(missing_ok=True)
        raise
    return path


def push_to_hub_command(folder: str | Path, repo_id: str) -> str:
    """The Python that uploads ``folder`` to the Hub as ``repo_id`` with ``huggingface_hub`` (returned, not run).

    Run it after ``hf auth login`` (or with ``HF_TOKEN`` set); ``exist_ok=True`` makes it safe to run again.
    """
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise LessonError(f"repo_id={repo_id!r}: give it as 'owner/name', e.g. 'your-name/SmolLM2-135M-GPTQ-4bit'.")
    return (
        "from huggingface_hub import HfApi\n\n"
        "api = HfApi()  # uses the token from `hf auth login` or HF_TOKEN\n"
        f'api.create_repo({json.dumps(repo_id)}, repo_type="model", exist_ok=True)\n'
        f'api.upload_folder(repo_id={json.dumps(repo_id)}, folder_path={json.dumps(str(folder))}, repo_type="model")\n'
    )
