"""Run every notebook whole on one model and commit its result tables: the pages show them side by side.

Each episode page shows, for the lesson's two offline models, the rows its notebook records
(`report.record`): size, bits per weight, perplexity, KL divergence, top-1 agreement and
quantization time. The site build executes the notebooks on the embedded model only, so both
models' rows come from a committed run of this command (CPU or GPU):

    # from the repository root, in the lesson's environment (one model at a time; 2 cores: not in parallel)
    .venv/bin/python tools/model_results.py run embedded
    .venv/bin/python tools/model_results.py run smollm2-offline
    # or: collect the tables of a run made elsewhere (tools/gpu_notebooks.py with LESSON_RESULTS set)
    .venv/bin/python tools/model_results.py collect RESULTS_FOLDER RECORD.json

It writes ``results/models/<model>/<episode>.csv`` and adds each notebook's row (pass or fail,
seconds, hardware, hashes of the notebook's code and of the helper package) to
``results/models/runs.json``. ``tests/test_model_results.py`` fails when a run failed, or when
a notebook or the package changed after its recorded run; ``_ext/lesson_results.py`` draws the
tables on the pages (``{model-results}`` directive).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDER = ROOT / "results" / "models"
RUNS = FOLDER / "runs.json"
MODELS = ("embedded", "smollm2-offline")

_spec = importlib.util.spec_from_file_location("gpu_notebooks", ROOT / "tools" / "gpu_notebooks.py")
gpu_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_notebooks)


def notebooks() -> list[Path]:
    """Every episode notebook, in the order a learner meets them (08 reads the tables of those before it)."""
    return sorted((ROOT / "notebooks").glob("*.ipynb"))


def hardware_of(tables: list[Path]) -> str | None:
    """The machine named in a notebook's result rows (``report.hardware()``), if it recorded any."""
    import pandas as pd

    for table in tables:
        names = pd.read_csv(table)["hardware"].dropna().unique() if table.stat().st_size else []
        if len(names):
            return str(names[0])
    return None


def collect(results: Path, record: Path) -> None:
    """Copy the tables of ``results/<model>/`` into ``results/models/<model>/`` and merge ``record``'s rows."""
    rows = json.loads(RUNS.read_text()) if RUNS.exists() else []
    for row in json.loads(record.read_text()):
        model = row.get("model")
        if model not in MODELS:
            raise SystemExit(f"{row['notebook']} ran on {model!r}; the pages show only {MODELS}")
        stem = Path(row["notebook"]).stem
        source = results / model
        tables = sorted(source.glob(f"{stem}*.csv")) if source.is_dir() else []
        target = FOLDER / model
        target.mkdir(parents=True, exist_ok=True)
        for old in target.glob(f"{stem}*.csv"):
            old.unlink()
        for table in tables:
            shutil.copyfile(table, target / table.name)
        row = {**row, "hardware": hardware_of(tables) or row.get("gpu"), "tables": [t.name for t in tables]}
        rows = [r for r in rows if (r["notebook"], r["model"]) != (row["notebook"], model)] + [row]
        print(f"{row['notebook']:32} {model:16} {'passed' if row['passed'] else 'FAILED':7} "
              f"{row.get('seconds', '?'):>7} s  {', '.join(row['tables']) or '(no table)'}")
    rows.sort(key=lambda r: (r["model"], r["notebook"]))
    FOLDER.mkdir(parents=True, exist_ok=True)
    RUNS.write_text(json.dumps(rows, indent=1) + "\n")


def run(model: str, chosen: list[Path]) -> int:
    """Run ``chosen`` notebooks (default: all) whole on ``model``, one process each, then :func:`collect`."""
    if model not in MODELS:
        raise SystemExit(f"Choose one of {MODELS}, not {model!r}.")
    with tempfile.TemporaryDirectory(prefix="model-results-") as scratch:
        os.environ.update(LESSON_MODEL=model, LESSON_RESULTS=str(Path(scratch) / "results"), MPLBACKEND="Agg")
        if (FOLDER / model).is_dir():  # the committed tables of the other episodes: 08 compares them all
            shutil.copytree(FOLDER / model, Path(scratch) / "results" / model)
            for notebook in chosen or notebooks():  # but the notebooks that run now start from empty tables
                for table in (Path(scratch) / "results" / model).glob(f"{notebook.stem}*.csv"):
                    table.unlink()
        record = Path(scratch) / "record.json"
        code = gpu_notebooks.run(record, chosen or notebooks(), float(os.environ.get("NOTEBOOK_TIMEOUT", "1800")))
        collect(Path(scratch) / "results", record)
    return code


def main(argv: list[str]) -> int:
    if argv[:1] == ["run"] and len(argv) >= 2:
        return run(argv[1], [Path(p).resolve() for p in argv[2:]])
    if argv[:1] == ["collect"] and len(argv) == 3:
        collect(Path(argv[1]), Path(argv[2]))
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
