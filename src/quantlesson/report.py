"""The lesson's results table: every episode records its rows; the comparison episode reads them all.

A table is a CSV file. :func:`record` adds or replaces one row, keyed by
(episode, model, method, bits, group size, hardware), so running a notebook
twice does not duplicate its rows. Files are written to a temporary name and
renamed, so an interrupted run never leaves half a table.
"""

from __future__ import annotations

import math
import os
import platform
import tempfile
from pathlib import Path

import pandas as pd

from quantlesson.errors import LessonError

COLUMNS = [
    "episode", "model", "method", "bits", "group_size", "size_mb", "bits_per_weight",
    "perplexity", "kld", "top1", "prefill_tok_s", "decode_tok_s", "quant_seconds", "quant_peak_mb",
    "calibration", "hardware",
]  # fmt: skip
KEY = ["episode", "model", "method", "bits", "group_size", "hardware"]


def results_folder(model: str | None = None) -> Path:
    """Where this machine keeps result tables: ``$LESSON_RESULTS``, else ``~/.cache/quantlesson/results/<model>``
    (``<model>`` as :func:`quantlesson.models.label` names it)."""
    from quantlesson.embedded import cache_root
    from quantlesson.models import label

    configured = os.environ.get("LESSON_RESULTS")
    root = Path(configured).expanduser() if configured else cache_root() / "results"
    return root / (model or label()).replace("/", "--")


def hardware() -> str:
    """A short name for the machine the numbers come from: the GPU's name, or the CPU and its thread count."""
    import torch

    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name()}"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {name}, {torch.get_num_threads()} threads"


def read(path: str | Path) -> pd.DataFrame:
    """One table (an empty one with the lesson's columns if the file does not exist yet)."""
    path = Path(path)
    if not path.exists():
        return pd.DataFrame(columns=COLUMNS)
    return pd.read_csv(path, keep_default_na=False, na_values=[""])


def _key_strings(table: pd.DataFrame) -> pd.DataFrame:
    """The key columns as comparable text: a missing value is "", and 128.0 read back from a CSV is "128"."""

    def text(value) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return str(value)

    return table[KEY].astype(object).map(text)


def record(path: str | Path, **row) -> None:
    """Add (or replace) one row of the table at ``path`` (read it back with :func:`read`).

    Fields are the :data:`COLUMNS`; ``episode``, ``model`` and ``method`` are required,
    ``hardware`` defaults to :func:`hardware`.
    """
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise LessonError(f"Unknown result fields {sorted(unknown)}: the table has {COLUMNS}.")
    missing = {"episode", "model", "method"} - set(row)
    if missing:
        raise LessonError(f"A result row needs {sorted(missing)}.")
    row.setdefault("hardware", hardware())
    path = Path(path)
    table = read(path)
    new = pd.DataFrame([{column: row.get(column) for column in COLUMNS}])
    if len(table):
        same = (_key_strings(table) == _key_strings(new).iloc[0]).all(axis=1)
        table = table[~same]
    table = pd.concat([table.astype(object), new.astype(object)], ignore_index=True).reindex(columns=COLUMNS)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, scratch = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(handle)
    try:
        table.to_csv(scratch, index=False)
        os.replace(scratch, path)
    except BaseException:
        Path(scratch).unlink(missing_ok=True)
        raise


def combine(paths) -> pd.DataFrame:
    """All rows of several tables (files that do not exist are skipped)."""
    tables = [read(p) for p in paths if Path(p).exists()]
    if not tables:
        return pd.DataFrame(columns=COLUMNS)
    return pd.concat([t.astype(object) for t in tables], ignore_index=True).reindex(columns=COLUMNS)


def plot(
    table: pd.DataFrame, x: str = "bits_per_weight", y: str = "kld", label: str = "method", ax=None, logy: bool = True,
    annotate: bool = True,
):  # fmt: skip
    """Scatter ``y`` against ``x``, one colour per ``label`` (each point tagged with its bits and group size
    unless ``annotate=False``); return the axes. With many groups the legend goes beside the axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4.5))
    rows = table.dropna(subset=[x, y])
    rows = rows[rows[y].astype(float) > 0] if logy else rows
    for method, group in rows.groupby(label, sort=False):
        ax.plot(group[x].astype(float), group[y].astype(float), "o", label=str(method), alpha=0.85)
        if not annotate:
            continue
        for _, r in group.iterrows():
            tag = f"{int(r['bits'])}b" if pd.notna(r.get("bits")) and str(r.get("bits")) != "" else ""
            if pd.notna(r.get("group_size")) and str(r.get("group_size")) not in ("", "nan"):
                tag += f" g{r['group_size']}"
            ax.annotate(tag, (float(r[x]), float(r[y])), textcoords="offset points", xytext=(4, 3), fontsize=7)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(y.replace("_", " "))
    ax.grid(alpha=0.3)
    if rows[label].nunique() > 8:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    else:
        ax.legend(fontsize=8)
    return ax
