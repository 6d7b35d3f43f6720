"""Run a notebook's GPU cells on a GPU machine and put their real outputs back into the notebook.

The site is built on CPUs, where myst-nb skips cells tagged ``skip-execution``
and renders the outputs stored in them. Those outputs must come from a real run:

    # on the GPU machine, from the repository root (needs only torch, transformers, pandas, matplotlib):
    PYTHONPATH=src python tools/gpu_cells.py run notebooks/08-which-method.ipynb gpu-outputs.json [1,2]
    # back here:
    python tools/gpu_cells.py merge notebooks/08-which-method.ipynb gpu-outputs.json

``run`` executes the tagged cells in order, in one namespace, and records what
each printed, displayed or returned (as Jupyter would: the value of a final
expression, figures as PNG). ``merge`` writes those outputs into the same cells,
after checking that the cells' code is unchanged since the run.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import hashlib
import io
import json
import sys
import time
from pathlib import Path

TAG = "skip-execution"


def gpu_cells(notebook: dict) -> list[dict]:
    return [c for c in notebook["cells"] if c["cell_type"] == "code" and TAG in c.get("metadata", {}).get("tags", [])]


def source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def digest(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()[:16]


def _figures() -> list[dict]:
    import matplotlib.pyplot as plt

    outputs = []
    for number in plt.get_fignums():
        buffer = io.BytesIO()
        plt.figure(number).savefig(buffer, format="png", bbox_inches="tight", dpi=100)
        outputs.append({"output_type": "display_data", "metadata": {},
                        "data": {"image/png": base64.b64encode(buffer.getvalue()).decode(), "text/plain": "<Figure>"}})
    plt.close("all")
    return outputs


def _rich(value) -> dict:
    data = {"text/plain": repr(value)}
    if hasattr(value, "_repr_html_"):
        html = value._repr_html_()
        if html:
            data["text/html"] = html
    return {"output_type": "execute_result", "metadata": {}, "data": data, "execution_count": None}


def run_cell(code: str, namespace: dict) -> list[dict]:
    """Execute one cell like Jupyter: statements, then the value of a final expression."""
    tree = ast.parse(code)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    stdout = io.StringIO()
    value = None
    with contextlib.redirect_stdout(stdout):
        exec(compile(tree, "<cell>", "exec"), namespace)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), namespace)
    outputs = [{"output_type": "stream", "name": "stdout", "text": stdout.getvalue()}] if stdout.getvalue() else []
    outputs += _figures()
    if value is not None:
        outputs.append(_rich(value))
    return outputs


def run(notebook_path: str, out_path: str, only: str = "") -> None:
    """Run the GPU cells (or only those numbered in ``only``, e.g. "1,2,3", counting GPU cells from 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import os

    notebook = json.loads(Path(notebook_path).read_text())
    out = Path(out_path).resolve()
    os.chdir(Path(notebook_path).resolve().parent)  # cells run where Jupyter would run them
    chosen = {int(n) for n in only.split(",") if n} or set(range(1, len(gpu_cells(notebook)) + 1))
    namespace: dict = {"__name__": "__main__"}
    results = []
    for number, cell in enumerate(gpu_cells(notebook), start=1):
        if number not in chosen:
            continue
        code = source(cell)
        start = time.perf_counter()
        outputs = run_cell(code, namespace)
        print(f"[gpu_cells] cell {number} ({digest(code)}) ran in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        results.append({"number": number, "digest": digest(code), "outputs": outputs})
        out.write_text(json.dumps(results))  # after every cell: a run cut short keeps what it did


def merge(notebook_path: str, outputs_path: str) -> None:
    """Put a run's outputs into their cells; cells the run left out keep the outputs they had."""
    notebook = json.loads(Path(notebook_path).read_text())
    results = json.loads(Path(outputs_path).read_text())
    cells = gpu_cells(notebook)
    numbered = [r.get("number", i) for i, r in enumerate(results, start=1)]
    if not set(numbered) <= set(range(1, len(cells) + 1)):
        raise SystemExit(f"{len(cells)} GPU cells in the notebook, but results for cells {numbered}: run them again.")
    for number, result in zip(numbered, results):
        cell = cells[number - 1]
        if digest(source(cell)) != result["digest"]:
            raise SystemExit(f"GPU cell {number} changed since the run: run it again.")
        cell["outputs"] = result["outputs"]
        cell["execution_count"] = None
    Path(notebook_path).write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    {"run": run, "merge": merge}[command](*arguments)
