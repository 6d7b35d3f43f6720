"""The committed record of whole notebooks run on a GPU (tools/gpu_notebooks.py) is complete, green and fresh.

A learner in Colab or HPC Jupyter runs every cell on a GPU; the site build runs them on a CPU. The record
says that each notebook, as it is now, with the helper package as it is now, ran start to end on a GPU.
When this test fails after a change, run the notebooks again on a GPU (tools/gpu_run.sh says how).
"""

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gpu_notebooks", ROOT / "tools" / "gpu_notebooks.py")
gpu_notebooks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_notebooks)
RECORD = json.loads(gpu_notebooks.RECORD.read_text()) if gpu_notebooks.RECORD.exists() else []
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
RERUN = "run it again on a GPU: bash tools/gpu_run.sh (see tools/gpu_notebooks.py), then merge the record"


def row(notebook: Path, model: str = "embedded") -> dict:
    """The notebook's recorded GPU run; a notebook not yet run whole on a GPU is skipped, and the skip says so."""
    rows = [r for r in RECORD if r["notebook"] == notebook.name and r.get("model") == model]
    if not rows:
        pytest.skip(f"{notebook.name} has no recorded GPU run on the {model} model yet: {RERUN}")
    return rows[0]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_passed_whole_on_a_gpu(notebook):
    result = row(notebook)
    assert result["passed"], f"{notebook.name} failed on the GPU at cell {result.get('failed_cell')}: {result.get('error')}"
    assert result["gpu"] != "none (CPU)" and result["torch"], result


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_gpu_run_is_of_the_notebook_and_package_as_they_are_now(notebook):
    result = row(notebook)
    assert result["notebook_hash"] == gpu_notebooks.notebook_hash(notebook), f"{notebook.name} changed since its GPU run: {RERUN}"
    assert result["package_hash"] == gpu_notebooks.package_hash(notebook=notebook), (
        f"a module of src/quantlesson that {notebook.name} imports changed since its GPU run: {RERUN}")


def test_the_record_holds_runs_of_existing_notebooks_on_a_gpu():
    if not RECORD:
        pytest.skip(f"no GPU run is recorded for the notebooks and package as they are now: {RERUN}")
    names = {n.name for n in NOTEBOOKS}
    assert {r["notebook"] for r in RECORD} <= names, "the record names a notebook that no longer exists: merge a new run"
    assert all("NVIDIA" in r["gpu"] or "AMD" in r["gpu"] for r in RECORD)


def test_the_record_hashes_see_code_but_not_outputs(tmp_path):
    notebook = {"cells": [{"cell_type": "code", "source": ["x = 1\n"], "outputs": []},
                          {"cell_type": "markdown", "source": ["text"]}]}
    first = tmp_path / "a.ipynb"
    first.write_text(json.dumps(notebook))
    before = gpu_notebooks.notebook_hash(first)
    notebook["cells"][0]["outputs"] = [{"output_type": "stream", "text": "1"}]
    notebook["cells"][1]["source"] = ["other text"]
    first.write_text(json.dumps(notebook))
    assert gpu_notebooks.notebook_hash(first) == before
    notebook["cells"][0]["source"] = ["x = 2\n"]
    first.write_text(json.dumps(notebook))
    assert gpu_notebooks.notebook_hash(first) != before


def test_magics_are_skipped_keeping_the_indentation():
    code = 'if missing:\n    %pip install -q "quantlesson[lesson]"\n!ls\nx = 1'
    assert gpu_notebooks.without_magics(code) == "if missing:\n    pass\npass\nx = 1"
    compile(gpu_notebooks.without_magics(code), "cell", "exec")


def test_the_package_hash_follows_the_modules_a_notebook_imports(tmp_path):
    package = tmp_path / "src" / "quantlesson"
    (package / "scratch").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "scratch" / "__init__.py").write_text("")
    (package / "scratch" / "gptq.py").write_text("from quantlesson import errors\n")
    (package / "errors.py").write_text("class LessonError(Exception): pass\n")
    (package / "unused.py").write_text("x = 1\n")
    notebook = tmp_path / "n.ipynb"
    notebook.write_text(json.dumps({"cells": [{"cell_type": "code", "source": ["from quantlesson.scratch import gptq\n"]}]}))
    files = {p.relative_to(package).as_posix() for p in gpu_notebooks.package_files(
        "from quantlesson.scratch import gptq", tmp_path)}
    assert files == {"__init__.py", "scratch/__init__.py", "scratch/gptq.py", "errors.py"}  # through gptq's own import
    before = gpu_notebooks.package_hash(tmp_path, notebook)
    (package / "unused.py").write_text("x = 2\n")  # a module the notebook never reaches
    assert gpu_notebooks.package_hash(tmp_path, notebook) == before
    assert gpu_notebooks.package_hash(tmp_path) != gpu_notebooks.package_hash(tmp_path, notebook)
    (package / "errors.py").write_text("class LessonError(ValueError): pass\n")  # reached through gptq
    assert gpu_notebooks.package_hash(tmp_path, notebook) != before


def _gpu_run_function(name: str) -> str:
    """One shell function of tools/gpu_run.sh, as text (the script itself runs a stage when executed)."""
    import re

    script = (Path(__file__).resolve().parent.parent / "tools" / "gpu_run.sh").read_text()
    match = re.search(rf"^{name}\(\) {{.*?^}}$", script, flags=re.S | re.M)
    assert match, f"tools/gpu_run.sh has no function {name}"
    return match.group(0)


def _run_gpu_functions(tmp_path, body: str, python3: str, **env) -> subprocess.CompletedProcess:
    """Run functions of tools/gpu_run.sh under ``set -euo pipefail`` with a stub ``python3`` (its shell script body)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python3").write_text("#!/bin/sh\n" + python3)
    (bin_dir / "python3").chmod(0o755)
    functions = "\n".join(_gpu_run_function(name) for name in ("stamp", "ext_build", "save_kernels", "restore_kernels"))
    return subprocess.run(["bash", "-c", f"set -euo pipefail\n{functions}\n{body}\nwait\n"], capture_output=True, text=True,
                          check=True, env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", **env})  # fmt: skip


@pytest.mark.parametrize("package", ["exllamav2", "exllamav3"])
@pytest.mark.parametrize("built, locked", [(False, True), (True, True), (False, False)])
def test_a_kernel_build_clears_a_stale_lock_or_skips_a_finished_build(tmp_path, package, built, locked):
    """A build killed at a call's time limit left torch's lock behind, and later imports waited on it for ever."""
    import shutil

    if shutil.which("pgrep") is None:
        pytest.skip("pgrep (procps) is not installed here; the GPU machine has it")
    folder = tmp_path / "ext" / f"{package}_ext"
    folder.mkdir(parents=True)
    if locked:
        (folder / "lock").touch()
    if built:
        (folder / f"{package}_ext.so").touch()
    log = tmp_path / "build.log"
    _run_gpu_functions(tmp_path, f"ext_build {package} {log}", f'echo stub build "$2" >> {tmp_path}/calls\n',  # stands in for the compile
                       TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))  # fmt: skip
    assert (folder / "lock").exists() == (locked and built)  # a finished build's folder is left alone
    if built:  # nothing to build: nothing compiles, and the log says it ended
        assert not (tmp_path / "calls").exists() and f"{package} build exit 0" in log.read_text()
    else:  # no compiler runs: a stale lock goes, and the package's build starts and ends
        calls = (tmp_path / "calls").read_text()
        assert calls.startswith(f"stub build import {package}, {package}.ext") and f"{package} build exit 0" in log.read_text()


@pytest.mark.parametrize("script", ["gpu_exl2_twin.py", "gpu_exl3_twin.py", "gpu_exl3_probe.py"])
def test_a_gpu_maintainer_script_refuses_a_machine_without_a_gpu_and_writes_nothing(tmp_path, script):
    """These scripts run only on the GPU machine; here they must at least import, say why they stop, and leave no table."""
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the script would run for real")
    out = tmp_path / "table.csv"
    result = subprocess.run([sys.executable, f"tools/{script}", str(out), "Llama-3.1-8B", "2"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent.parent, env={**os.environ, "LESSON_MODEL": "embedded"})  # fmt: skip
    assert result.returncode == 1 and "needs an NVIDIA GPU" in result.stdout + result.stderr
    assert not out.exists()


def test_built_kernels_go_back_compressed_and_a_later_machine_loads_them_instead_of_building(tmp_path):
    """save_kernels brings ExLlamaV3's JIT build back; restore_kernels puts it where `import exllamav3_ext` finds it."""
    built = tmp_path / "ext" / "exllamav3_ext"
    built.mkdir(parents=True)
    (built / "exllamav3_ext.so").write_bytes(b"\x7fELF kernels" * 100)
    out, site = tmp_path / "out", tmp_path / "site"
    site.mkdir()
    _run_gpu_functions(tmp_path, f"save_kernels {out}", "echo 'python 3.12 | torch 2.11'", TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    assert sorted(p.name for p in (out / "kernels").iterdir()) == ["ABI.txt", "exllamav3_ext.so.xz"]  # ExLlamaV2 was not built
    bundle = importlib.util.spec_from_file_location("gpu_bundle", Path(__file__).resolve().parent.parent / "tools" / "gpu_bundle.py")
    gpu_bundle = importlib.util.module_from_spec(bundle)
    bundle.loader.exec_module(gpu_bundle)
    kept = gpu_bundle.keep_kernels(out / "kernels", tmp_path / "gpu" / "kernels")
    log = tmp_path / "exl3-build.log"
    result = _run_gpu_functions(tmp_path, f"restore_kernels {tmp_path / 'none'} {kept}\next_build exllamav3 {log}",
                                f"echo imported >> {tmp_path}/calls", SITE=str(site), TORCH_EXTENSIONS_DIR=str(tmp_path / "new"))  # fmt: skip
    assert (site / "exllamav3_ext.so").read_bytes() == (built / "exllamav3_ext.so").read_bytes()
    assert "restored" in result.stdout and "prebuilt" in log.read_text()
    assert (tmp_path / "calls").read_text() == "imported\n"  # the import check only: no build started
    # a module that does not import beside this machine's torch is removed, and the package builds as usual
    result = _run_gpu_functions(tmp_path, f"restore_kernels {kept}", "exit 1", SITE=str(site))
    assert not (site / "exllamav3_ext.so").exists() and "will be built" in result.stdout
    with pytest.raises(SystemExit, match="No \\*_ext.so.xz"):
        gpu_bundle.keep_kernels(tmp_path / "site")
