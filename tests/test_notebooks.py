"""The notebooks: executed once, by the site build (``make html``); these tests read that execution
from the build's jupyter-cache instead of running every notebook a second time."""

from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
GPU_TAG = "skip-execution"  # cells whose committed outputs come from a real GPU run


def forced(path: Path) -> bool:
    """Notebooks that read other notebooks' results run in every build, outside the cache."""
    return nbformat.read(path, nbformat.NO_CONVERT).metadata.get("mystnb", {}).get("execution_mode") == "force"


def executed(path: Path) -> nbformat.NotebookNode:
    """The executed copy of ``path`` from the build's cache; fails if the current code never ran clean."""
    from jupyter_cache import get_cache

    if forced(path):
        pytest.skip(f"{path.name} runs in every build (a failing cell fails the build): see test_site.py")

    import runpy

    cache = get_cache(runpy.run_path(str(ROOT / "conf.py"))["nb_execution_cache_path"])  # the build's cache
    try:
        record = cache.match_cache_notebook(nbformat.read(path, nbformat.NO_CONVERT))
    except KeyError:
        pytest.fail(f"{path.name} has not been executed successfully in its current form: run `make html`.")
    return cache.get_cache_bundle(record.pk).nb


def code_cells(notebook):
    return [c for c in notebook.cells if c.cell_type == "code"]


def text_of(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if "text" in output:
            parts.append(output["text"])
        parts.extend(str(v) for k, v in output.get("data", {}).items() if k.startswith("text/"))
    return "".join(parts)


@pytest.fixture(params=NOTEBOOKS, ids=lambda p: p.stem)
def notebook(request):
    return request.param


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 2


def test_notebook_ran_clean_in_the_site_build(notebook):
    run = executed(notebook)
    for cell in code_cells(run):
        assert not [o for o in cell.get("outputs", []) if o.output_type == "error"], cell.source[:200]
    assert any(cell.get("outputs") for cell in code_cells(run))


def test_notebook_says_what_it_ran_on(notebook):
    source = nbformat.read(notebook, nbformat.NO_CONVERT)
    if not any("models.load(" in c.source for c in code_cells(source)):
        pytest.skip("this notebook loads no model")
    printed = "".join(text_of(c) for c in code_cells(executed(notebook)))
    assert "Model: " in printed


def test_notebook_is_stored_without_stale_outputs(notebook):
    source = nbformat.read(notebook, nbformat.NO_CONVERT)
    for cell in code_cells(source):
        if GPU_TAG in cell.metadata.get("tags", []):
            continue  # outputs of a real GPU run, committed on purpose
        assert not cell.outputs and cell.execution_count is None, f"{notebook.name}: stored output in {cell.source[:80]!r}"


def test_notebook_has_its_page_and_opens_in_colab(notebook):
    page = ROOT / "content" / f"{notebook.stem}.md"
    assert page.exists(), f"no page content/{notebook.stem}.md for {notebook.name}"
    text = page.read_text()
    assert f"../notebooks/{notebook.stem}" in text and f"{{colab}}`notebooks/{notebook.name}`" in text
    first_code = code_cells(nbformat.read(notebook, nbformat.NO_CONVERT))[0].source
    assert "find_spec(\"quantlesson\")" in first_code and "%pip install" in first_code


def test_colab_installs_this_repository_with_pinned_versions(notebook):
    """The first cell installs the package from the repository the site links to, with the 'lesson' extra."""
    import re
    import tomllib

    conf = (ROOT / "conf.py").read_text()
    user = re.search(r'"LESSON_GITHUB_USER", "([^"]+)"', conf).group(1)
    repo = re.search(r'"LESSON_GITHUB_REPO", "([^"]+)"', conf).group(1)
    first = code_cells(nbformat.read(notebook, nbformat.NO_CONVERT))[0].source
    assert f'"LESSON_REPOSITORY", "https://github.com/{user}/{repo}")' in first  # a fork sets LESSON_REPOSITORY
    assert 'quantlesson[lesson] @ git+{REPOSITORY}' in first
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["lesson"]
    pinned = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines() if "==" in line)
    for requirement in extra + re.findall(r'"([A-Za-z0-9_.-]+==[^"]+)"', first):  # the extra, and any other pins of the cell
        name, version = requirement.split("==")
        assert pinned.get(name) == version, f"{name}: {notebook.name} or the 'lesson' extra pins {version}, requirements.txt {pinned.get(name)}"


def test_gpu_cells_keep_the_outputs_of_a_real_run(notebook):
    """Cells tagged for the GPU are rendered from their committed outputs: each has some, and they name the GPU."""
    cells = [c for c in code_cells(nbformat.read(notebook, nbformat.NO_CONVERT)) if GPU_TAG in c.metadata.get("tags", [])]
    if not cells:
        pytest.skip("this notebook has no GPU cells")
    assert all(c.outputs for c in cells), f"{notebook.name}: a GPU cell without outputs: run tools/gpu_cells.py on a GPU"
    printed = "".join(text_of(c) for c in cells)
    assert "NVIDIA" in printed, f"{notebook.name}: the GPU cells' outputs do not name the GPU they ran on"
    assert "Traceback" not in printed and not [o for c in cells for o in c.outputs if o.output_type == "error"]


def test_each_model_has_its_own_execution_cache(monkeypatch):
    """A build on another model must execute the notebooks again, not serve the embedded model's outputs."""
    import runpy

    paths = {}
    for model in ("embedded", "smollm2-offline"):
        monkeypatch.setenv("LESSON_MODEL", model)
        paths[model] = runpy.run_path(str(ROOT / "conf.py"))["nb_execution_cache_path"]
    assert paths["embedded"] != paths["smollm2-offline"] and "smollm2-offline" in paths["smollm2-offline"]
