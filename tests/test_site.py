"""The built site (``make html`` runs before these tests): pages, offline math, collapsed solutions,
and a build that fails when a notebook cell fails."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"


@pytest.fixture(scope="module")
def site():
    if not (HTML / "index.html").exists():
        pytest.fail("The site is not built: run `make html` (or `make test`, which builds it first).")
    return HTML


def pages(site):
    return sorted(p for p in site.rglob("*.html") if "_static" not in p.parts and p.name not in {"genindex.html", "search.html"})


def test_every_episode_and_notebook_has_a_page(site):
    for source in list((ROOT / "content").glob("*.md")) + list((ROOT / "notebooks").glob("*.ipynb")):
        built = site / source.relative_to(ROOT).with_suffix(".html")
        assert built.exists(), f"{source.name} was not built"


def test_math_is_served_from_the_site_not_a_cdn(site):
    assert (site / "_static" / "mathjax" / "tex-chtml.js").exists()
    page = (site / "content" / "01-why-quantize.html").read_text()
    assert "_static/mathjax/tex-chtml.js" in page
    for html in pages(site):
        assert "cdn.jsdelivr.net" not in html.read_text(), html


def test_solutions_are_collapsed_and_exercises_listed(site):
    page = (site / "content" / "02-absmax-zeropoint.html").read_text()
    solutions = re.findall(r'<div class="[^"]*\bsolution\b[^"]*"', page)
    assert solutions and all("dropdown" in s for s in solutions)  # togglebutton collapses dropdowns
    listing = (site / "content" / "exercises.html").read_text()
    assert len(re.findall(r'<div class="[^"]*\bexercise\b[^"]*"', listing)) >= 9


def test_notebook_pages_show_outputs_and_plots(site):
    for notebook in (ROOT / "notebooks").glob("*.ipynb"):
        html = (site / "notebooks" / f"{notebook.stem}.html").read_text()
        assert "cell_output" in html, f"{notebook.name} has no outputs on its page"
        for image in re.findall(r'<img[^>]+src="([^"]+)"', html):
            if not image.startswith(("http", "data:")):
                assert (site / "notebooks" / image).resolve().exists(), f"{notebook.name}: missing image {image}"


def test_every_page_links_only_to_pages_that_exist(site):
    for html in pages(site):
        for target in re.findall(r'href="([^"#?]+\.html)', html.read_text()):
            if not target.startswith(("http://", "https://")):
                assert (html.parent / target).resolve().exists(), f"{html.relative_to(site)} links to missing {target}"


def test_a_failing_cell_fails_the_build(tmp_path):
    """The same configuration as the lesson, on a one-notebook project whose only cell raises."""
    import nbformat

    (tmp_path / "_static_").mkdir()
    (tmp_path / "conf.py").write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom conf import *\n")
    (tmp_path / "index.md").write_text("# Test\n\n```{toctree}\nbroken\n```\n")
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("raise ValueError('deliberate')")])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, tmp_path / "broken.ipynb")
    env = {**os.environ, "LESSON_JUPYTER_CACHE": str(tmp_path / ".cache")}
    build = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(tmp_path), str(tmp_path / "_build")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert build.returncode != 0
    assert "deliberate" in build.stdout + build.stderr


def _output_project(tmp_path, tag: str) -> subprocess.CompletedProcess:
    """A page that shows a notebook cell's output with {notebook-output}, built with the lesson's configuration."""
    import nbformat

    (tmp_path / "_static_").mkdir()
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "conf.py").write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom conf import *\n")
    (tmp_path / "index.md").write_text("# Test\n\n```{toctree}\npage\nnotebooks/demo\n```\n")
    (tmp_path / "page.md").write_text(f"# Page\n\n:::{{notebook-output}} demo {tag}\n:::\n")
    cell = nbformat.v4.new_code_cell("print(6 * 7)", metadata={"tags": ["result-answer"]})
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="the answer is 42\n")]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Demo"), cell])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, tmp_path / "notebooks" / "demo.ipynb")
    env = {**os.environ, "LESSON_EXECUTION": "off", "LESSON_JUPYTER_CACHE": str(tmp_path / ".cache")}
    return subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(tmp_path), str(tmp_path / "_build")],
        capture_output=True, text=True, env=env, timeout=600,
    )


def test_notebook_output_shows_the_tagged_cell_on_the_page(tmp_path):
    build = _output_project(tmp_path, "result-answer")
    assert build.returncode == 0, build.stdout + build.stderr
    page = (tmp_path / "_build" / "page.html").read_text()
    block = page[page.index('class="notebook-output'):]
    assert "the answer is 42" in block and 'href="notebooks/demo.html"' in block
    assert "print(6 * 7)" not in page  # the output, not the code


def test_notebook_output_with_an_unknown_tag_fails_the_build(tmp_path):
    build = _output_project(tmp_path, "result-missing")
    assert build.returncode != 0
    assert "no cell carries that tag" in build.stdout + build.stderr


def test_every_page_shows_its_tagged_results(site):
    """Each {notebook-output} on a page names a tag its notebook carries, and the built page shows an output there."""
    import nbformat

    used = 0
    for page in sorted((ROOT / "content").glob("*.md")):
        for stem, tag in re.findall(r"^:::\{notebook-output\} (\S+) (\S+)$", page.read_text(), flags=re.M):
            notebook = nbformat.read(ROOT / "notebooks" / f"{stem}.ipynb", nbformat.NO_CONVERT)
            assert any(tag in c.metadata.get("tags", []) for c in notebook.cells), f"{page.name}: no cell of {stem} has tag {tag}"
            used += 1
        html = (site / "content" / page.with_suffix(".html").name).read_text()
        assert "(missing output" not in html, page.name
    assert used >= 20  # the episodes show their proofs, sweeps and verdicts


def test_the_api_page_has_a_section_for_every_module_of_the_package():
    """The API page says it lists every module: a new module without a section there fails here."""
    sections = set(re.findall(r"^## (\S+)", (ROOT / "content" / "api.md").read_text(), flags=re.M))
    package = ROOT / "src" / "quantlesson"
    modules = {p.stem for p in package.glob("*.py")} | {f"scratch.{p.stem}" for p in (package / "scratch").glob("*.py")}
    assert modules - {"__init__", "scratch.__init__"} - sections == set()


def test_the_api_page_renders_every_autodoc_entry(site):
    """Autodoc writes reStructuredText: in a MyST ```{autofunction}``` fence it showed as raw '.. py:function::' text."""
    page = (site / "content" / "api.html").read_text()
    entries = len(re.findall(r"^\.\. auto(?:function|class)::", (ROOT / "content" / "api.md").read_text(), flags=re.M))
    assert entries > 200 and ".. py:function::" not in page and ".. py:class::" not in page
    assert len(re.findall(r'<dl class="py (?:function|class)">', page)) == entries
