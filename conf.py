"""Sphinx configuration of the lesson 'Quantizing large language models'."""

import os
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "src"))
sys.path.insert(0, str(HERE / "_ext"))  # the lesson's own directives

project = "Quantizing large language models"
author = "The lesson's contributors"
copyright = "2026, the lesson's contributors. Text CC BY 4.0, code MIT"
github_user = os.environ.get("LESSON_GITHUB_USER", "coderefinery")
github_repo_name = os.environ.get("LESSON_GITHUB_REPO", "quantizing-llms")
github_version = "main"

extensions = [
    "sphinx_lesson",  # brings myst_nb, copybutton, tabs, togglebutton and the lesson directives
    "sphinx_design",
    "sphinx.ext.mathjax",
    "sphinx.ext.autodoc",
    "sphinx-mathjax-offline",  # MathJax served from the site itself: math renders without internet
    "lesson_results",  # {model-results}: an episode's committed rows on both offline models
    "notebook_output",  # {notebook-output}: a tagged notebook cell's output, from this build, on the episode page
]

# MyST: colon fences for admonitions, $...$ math, definition lists, {term} links.
myst_enable_extensions = ["colon_fence", "dollarmath", "amsmath", "deflist", "substitution", "attrs_inline"]
myst_heading_anchors = 3

# Notebooks: executed by myst-nb through jupyter-cache; a failing cell fails the build.
nb_execution_mode = os.environ.get("LESSON_EXECUTION", "cache")
def _package_digest() -> str:
    """A hash of the helper package's code and of the committed GPU measurements that notebooks read
    (``results/gpu-*.csv``): notebooks cached under another version re-execute."""
    import hashlib

    digest = hashlib.sha256()
    files = [p for p in (HERE / "src" / "quantlesson").rglob("*") if p.suffix in (".py", ".json")]
    for path in sorted(files + list((HERE / "results").glob("gpu-*.csv"))):
        digest.update(path.relative_to(HERE).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:12]


# One cache per model as well: a build on LESSON_MODEL=smollm2-offline must not reuse the embedded model's outputs.
_MODEL = os.environ.get("LESSON_MODEL", "hub-default").strip().replace("/", "--") or "hub-default"
nb_execution_cache_path = os.environ.get("LESSON_JUPYTER_CACHE", str(HERE / ".jupyter_cache" / f"{_MODEL}-{_package_digest()}"))
nb_execution_timeout = int(os.environ.get("LESSON_CELL_TIMEOUT", "900"))
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
nb_output_stderr = "remove"  # progress bars and library chatter stay out of the rendered pages
nb_execution_excludepatterns = []

html_theme = "sphinx_rtd_theme"
html_static_path = ["_static_"]
html_css_files = ["lesson.css"]
html_title = project
html_context = {
    "display_github": True,
    "github_user": github_user,
    "github_repo": github_repo_name,
    "github_version": github_version,
    "conf_py_path": "/",
}

exclude_patterns = [
    "_build", "jupyter_execute", ".*", "**/.*", "*venv*", "**/*venv*", "README.md", "LICENSE*",
    "CONTRIBUTING.md", "CHANGELOG.md", "src", "tests", "hpc", "artifacts", "work",
    "_static_/versions.md", "notebooks/README.md",
]  # fmt: skip
suppress_warnings = ["mystnb.unknown_mime_type"]
autodoc_typehints = "signature"
autodoc_member_order = "bysource"


def colab_role(name, rawtext, text, lineno, inliner, options=None, content=None):
    """``{colab}`notebooks/x.ipynb``` -> an "Open in Colab" link for that notebook of this repository."""
    from docutils import nodes

    url = f"https://colab.research.google.com/github/{github_user}/{github_repo_name}/blob/{github_version}/{text}"
    node = nodes.reference(rawtext, "Open in Colab", refuri=url, classes=["colab-badge"])
    return [node], []


def setup(app):
    app.add_role("colab", colab_role)

# `make linkcheck OFFLINE=1` checks only the site's own links and anchors (no internet needed).
linkcheck_anchors = True
if os.environ.get("LESSON_LINKCHECK_OFFLINE"):
    linkcheck_ignore = [r"https?://.*"]
