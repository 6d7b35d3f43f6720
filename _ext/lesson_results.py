"""``{model-results}``: an episode's measured rows on both of the lesson's offline models, in one table.

    :::{model-results} 04-awq
    :::

reads ``results/models/<model>/04-awq*.csv`` (committed by ``tools/model_results.py``) for the
embedded model and SmolLM2-135M-Instruct, and draws one table: each method, bit width and group
size once, with one line per model (size, bits per weight, perplexity, KL divergence, top-1
agreement, quantization time). The caption names the machine and date of each run.
The argument is an episode's stem, or a prefix that several share (``0`` for episodes 01-09). Option
``:match:`` keeps only methods whose name contains one of the given words (``|``-separated); ``:bits:``
only rows of those bit widths (``4|3``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.util.docutils import SphinxDirective

ROOT = Path(__file__).resolve().parent.parent
FOLDER = ROOT / "results" / "models"
MODELS = {"embedded": "embedded", "smollm2-offline": "SmolLM2-135M-Instruct"}
HEADER = ["method", "bits", "group", "model", "size (MB)", "bits / weight", "perplexity", "KLD", "top-1", "quantize (s)"]


def _float(value) -> float | None:
    """The value as a number, or None for an empty or missing cell."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _number(value, digits: int) -> str:
    number = _float(value)
    if number is None:
        return str(value) if value not in (None, "") and not isinstance(value, float) else "–"
    return f"{number:.{digits}f}"


def _kld(value) -> str:
    number = _float(value)
    return "–" if number is None else "0" if number == 0 else f"{number:.3g}"


def _group(value) -> str:
    text = _number(value, 0) if str(value).replace(".", "", 1).isdigit() else str(value)
    return "–" if text in ("", "nan") else text


def rows(episode: str, match: list[str] | None = None, bits: list[str] | None = None) -> tuple[list[tuple[str, str, str]], dict]:
    """The keys (method, bits, group) in first-seen order, and each model's row for each key."""
    import pandas as pd

    keys: list[tuple[str, str, str]] = []
    found: dict = {}
    for model in MODELS:
        for table in sorted((FOLDER / model).glob(f"{episode}*.csv")):
            frame = pd.read_csv(table, keep_default_na=False, na_values=[""])
            frame = frame[frame["model"] == model]  # shape-twin speed rows are for the comparison episode
            for _, row in frame.iterrows():
                if match and not any(word.lower() in str(row["method"]).lower() for word in match):
                    continue
                key = (str(row["method"]), _number(row["bits"], 0), _group(row["group_size"]))
                if bits and key[1] not in bits:
                    continue
                if key not in keys:
                    keys.append(key)
                found[key, model] = row
    return keys, found


def _cell(text: str, morerows: int = 0) -> nodes.entry:
    entry = nodes.entry(morerows=morerows) if morerows else nodes.entry()
    entry += nodes.paragraph(text=text)
    return entry


def _runs(episode: str) -> str:
    """"embedded: CPU …, 2026-12-03, whole notebook in 120 s; SmolLM2…: …" from ``runs.json``."""
    runs = json.loads((FOLDER / "runs.json").read_text()) if (FOLDER / "runs.json").exists() else []
    parts = []
    for model, name in MODELS.items():
        mine = [r for r in runs if r["model"] == model and Path(r["notebook"]).stem.startswith(episode) and r.get("tables")]
        failed = " (a run FAILED)" if any(not r["passed"] for r in mine) else ""
        if not mine:
            parts.append(f"{name}: not run yet")
        elif len(mine) == 1:
            run = mine[0]
            parts.append(f"{name}: {run.get('hardware')}, {run.get('date')}, whole notebook in {run.get('seconds')} s{failed}")
        else:
            machines = sorted({str(r.get("hardware")) for r in mine})
            parts.append(f"{name}: {len(mine)} notebooks on {' and '.join(machines)}, {max(r.get('date', '') for r in mine)}{failed}")
    return "; ".join(parts)


class ModelResults(SphinxDirective):
    required_arguments = 1
    option_spec = {"match": directives.unchanged, "bits": directives.unchanged}

    def run(self):
        episode = self.arguments[0]
        match = [w.strip() for w in self.options.get("match", "").split("|") if w.strip()] or None
        bits = [w.strip() for w in self.options.get("bits", "").split("|") if w.strip()] or None
        keys, found = rows(episode, match, bits)
        for model in MODELS:
            for table in (FOLDER / model).glob(f"{episode}*.csv"):
                self.env.note_dependency(str(table))
        self.env.note_dependency(str(FOLDER / "runs.json"))
        if not keys:  # tests/test_model_results.py fails on this; the page still builds and says so
            return [nodes.paragraph(text=f"No committed results for {episode} yet: run tools/model_results.py.")]
        table = nodes.table(classes=["model-results"])
        group = nodes.tgroup(cols=len(HEADER))
        table += group
        for _ in HEADER:
            group += nodes.colspec(colwidth=1)
        head = nodes.thead()
        header = nodes.row()
        for name in HEADER:
            header += _cell(name)
        head += header
        group += head
        body = nodes.tbody()
        for key in keys:
            present = [m for m in MODELS if (key, m) in found]
            for index, model in enumerate(present):
                row, line = found[key, model], nodes.row()
                if index == 0:
                    for text in key:
                        line += _cell(text, morerows=len(present) - 1)
                top1 = row["top1"]
                machine = str(row.get("hardware") or "")  # rows a GPU run measured (ExLlamaV2's) say so
                line += _cell(MODELS[model] + (f" ({machine.removeprefix('GPU: ')})" if machine.startswith("GPU") else ""))
                line += _cell(_number(row["size_mb"], 2))
                line += _cell(_number(row["bits_per_weight"], 3))
                line += _cell(_number(row["perplexity"], 2))
                line += _cell(_kld(row["kld"]))
                line += _cell("–" if _number(top1, 3) == "–" else f"{100 * float(top1):.1f} %")
                line += _cell(_number(row["quant_seconds"], 1))
                body += line
        group += body
        caption = nodes.paragraph(
            classes=["model-results-caption"],
            text=f"Measured by the notebooks, run whole on both offline models ({_runs(episode)}). "
            "KLD and top-1 compare with the same model unquantized, on the same tokens; perplexities of the two "
            "models are not comparable with each other. Committed by tools/model_results.py.",
        )
        container = nodes.container(classes=["model-results-block"])
        container += table
        container += caption
        return [container]


def setup(app):
    app.add_directive("model-results", ModelResults)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
