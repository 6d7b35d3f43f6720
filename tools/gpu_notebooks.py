"""Run whole notebooks on a GPU machine, as a learner in Colab or HPC Jupyter would, and record the result.

Every code cell runs, GPU cells included, in order, in one namespace per notebook and one
process per notebook (so one notebook's GPU memory cannot spill into the next). IPython
magics (``%pip install``: the package is already importable there) are skipped.

    # on the GPU machine, from the repository root:
    PYTHONPATH=src python tools/gpu_notebooks.py run OUT/record.json notebooks/01-why-quantize.ipynb ...
    # back here: add the rows to the committed record
    python tools/gpu_notebooks.py merge OUT/record.json

The record, ``results/gpu-notebooks.json``, holds for each notebook and model: pass or fail,
seconds, the GPU, torch's version, and hashes of the notebook's code and of the helper
package's modules it imports (directly or through other modules). ``tests/test_gpu_record.py``
fails when a row failed, or when a notebook or a module it imports changed after its recorded
run: then run it again on a GPU. A new module that no notebook imports leaves the record fresh.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "results" / "gpu-notebooks.json"


def code_cells(notebook: Path) -> list[str]:
    cells = json.loads(notebook.read_text())["cells"]
    return ["".join(c["source"]) if isinstance(c["source"], list) else c["source"] for c in cells if c["cell_type"] == "code"]


def notebook_hash(notebook: Path) -> str:
    """A hash of the notebook's code (not its outputs, which a run or a merge rewrites)."""
    return hashlib.sha256("\n\0".join(code_cells(notebook)).encode()).hexdigest()[:16]


def imported_modules(code: str) -> set[str]:
    """The ``quantlesson`` modules that Python code imports by name (``from quantlesson.scratch import gptq``
    gives ``quantlesson.scratch`` and ``quantlesson.scratch.gptq``), wherever the import statement stands."""
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name == "quantlesson" or name.startswith("quantlesson.")}


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The source file of module ``name`` under src/, or None when ``name`` is not a module (a function, say)."""
    path = root / "src" / Path(*name.split("."))
    return next((p for p in (path.with_suffix(".py"), path / "__init__.py") if p.is_file()), None)


def package_files(code: str, root: Path = ROOT) -> list[Path]:
    """The helper package's files that code can run: the modules it imports, the modules those import, and so on,
    with every package's ``__init__.py`` on the way and the package's data files (JSON)."""
    package = root / "src" / "quantlesson"
    found: set[Path] = set(package.rglob("*.json"))
    pending = [code]
    while pending:
        for name in imported_modules(pending.pop()):
            parts = name.split(".")
            for end in range(1, len(parts) + 1):  # quantlesson, quantlesson.scratch, quantlesson.scratch.gptq
                path = module_file(".".join(parts[:end]), root)
                if path is not None and path not in found:
                    found.add(path)
                    pending.append(path.read_text())
    return sorted(found)


def package_hash(root: Path = ROOT, notebook: Path | None = None) -> str:
    """A hash of the helper package's source: of the files a notebook can run when one is given (so a module
    the notebook never imports can change without making its recorded run stale), else of every file."""
    package = root / "src" / "quantlesson"
    if notebook is None:
        files = sorted(p for p in package.rglob("*") if p.is_file() and p.suffix in (".py", ".json"))
    else:
        files = package_files("\n".join(without_magics(cell) for cell in code_cells(notebook)), root)
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def without_magics(code: str) -> str:
    """Replace IPython magics and shell escapes (``%pip ...``, ``!ls``) by ``pass``, keeping the indentation."""
    lines = []
    for line in code.splitlines():
        stripped = line.lstrip()
        lines.append(line[: len(line) - len(stripped)] + "pass" if stripped.startswith(("%", "!")) else line)
    return "\n".join(lines)


def run_notebook(notebook: Path) -> dict:
    """Execute every code cell of ``notebook`` (in its own folder, as Jupyter does); return the row of the record."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    namespace: dict = {"__name__": "__main__"}
    started, failed_cell, error = time.perf_counter(), None, None
    os.chdir(notebook.parent)
    for number, code in enumerate(code_cells(notebook), start=1):
        print(f"--- {notebook.name}, cell {number}", flush=True)
        try:
            tree = compile(without_magics(code), f"<{notebook.stem} cell {number}>", "exec")
            exec(tree, namespace)
        except BaseException:  # noqa: BLE001 (a failing cell is the result)
            failed_cell, error = number, traceback.format_exc(limit=-6)
            print(error, flush=True)
            break
        finally:
            plt.close("all")
            sys.stdout.flush()
    from quantlesson import models

    return {
        "notebook": notebook.name,
        "model": models.label(),
        "passed": failed_cell is None,
        "failed_cell": failed_cell,
        "error": error.strip().splitlines()[-1] if error else None,
        "seconds": round(time.perf_counter() - started, 1),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)",
        "torch": torch.__version__,
        "notebook_hash": notebook_hash(notebook),
        "package_hash": package_hash(notebook=notebook),
        "date": time.strftime("%Y-%m-%d"),
    }


def run(record: Path, notebooks: list[Path], timeout: float) -> int:
    """Run each notebook in a fresh process; append its row to ``record`` as soon as it ends."""
    rows = json.loads(record.read_text()) if record.exists() else []
    for notebook in notebooks:
        # -X faulthandler: a crash in native code (llama.cpp, a CUDA kernel) still prints the Python line it came from
        command = [sys.executable, "-X", "faulthandler", __file__, "_one", str(notebook.resolve())]
        started, ended = time.perf_counter(), "timeout"
        try:
            result = subprocess.run(command, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout)
            lines = result.stdout.splitlines()
            row = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
            ended = f"exit code {result.returncode}" + (f" (signal {-result.returncode})" if result.returncode < 0 else "")
        except subprocess.TimeoutExpired:
            row = None
        if row is None:
            from quantlesson import models

            row = {"notebook": notebook.name, "model": models.label(), "passed": False, "error": f"process ended without a result after "
                   f"{time.perf_counter() - started:.0f} s ({ended}; timeout {timeout:.0f} s)",
                   "notebook_hash": notebook_hash(notebook), "package_hash": package_hash(notebook=notebook)}
        print(f"=== {row['notebook']}: {'passed' if row['passed'] else 'FAILED'} in {row.get('seconds', '?')} s", flush=True)
        rows = [r for r in rows if (r["notebook"], r.get("model")) != (row["notebook"], row.get("model"))] + [row]
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if all(r["passed"] for r in rows) else 1


def merge(source: Path, target: Path = RECORD) -> None:
    """Put the rows of a run's record into the committed one (a row replaces its notebook's and model's)."""
    rows = json.loads(target.read_text()) if target.exists() else []
    for row in json.loads(source.read_text()):
        rows = [r for r in rows if (r["notebook"], r.get("model")) != (row["notebook"], row.get("model"))] + [row]
    rows.sort(key=lambda r: (r.get("model") or "", r["notebook"]))
    target.write_text(json.dumps(rows, indent=1) + "\n")
    for row in rows:
        print(f"{row['notebook']:32} {row.get('model', '?'):16} {'passed' if row['passed'] else 'FAILED':7} {row.get('seconds', '?'):>7} s  {row.get('gpu', '')}")


def main(argv: list[str]) -> int:
    if argv[:1] == ["_one"]:
        with contextlib.redirect_stdout(sys.stderr):  # the notebook's output goes to the console ...
            row = run_notebook(Path(argv[1]))
        print(json.dumps(row))  # ... and the result, last, to the parent
        return 0
    if argv[:1] == ["run"] and len(argv) >= 3:
        timeout = float(os.environ.get("NOTEBOOK_TIMEOUT", "900"))
        return run(Path(argv[1]), [Path(p) for p in argv[2:]], timeout)
    if argv[:1] == ["merge"] and len(argv) == 2:
        merge(Path(argv[1]))
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
