"""``{notebook-output}``: a notebook cell's output, from this build's run, shown on the episode page.

    :::{notebook-output} 03-gptq result-proof
    :::

copies the output of the cell tagged ``result-proof`` in ``notebooks/03-gptq.ipynb``, as myst-nb
rendered it in this build (the notebook executed on the build's model), into the page, with a line
that links the notebook. Text, tables and plots come across as they are; nothing is typed by hand.

The tag lives in the cell's metadata, so tagging a cell leaves its code, and the GPU record's hash of
it, unchanged. A tag that no cell carries, or a cell without output, fails the build (``-W``).
A page is rewritten whenever a notebook it shows is re-read, so the page never shows an older run.
"""

from __future__ import annotations

import copy

from docutils import nodes
from sphinx.transforms.post_transforms import SphinxPostTransform
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)
FOLDER = "notebooks"


class notebook_output(nodes.General, nodes.Element):
    """Where a notebook cell's output goes; replaced at write time (the notebook may be read later)."""


def _users(env) -> dict[str, set[str]]:
    """Page docname -> the notebook docnames it shows, kept in the build environment."""
    if not hasattr(env, "notebook_output_users"):
        env.notebook_output_users = {}
    return env.notebook_output_users


class NotebookOutput(SphinxDirective):
    required_arguments = 2  # notebook stem, cell tag
    has_content = False

    def run(self):
        stem, tag = self.arguments
        notebook = f"{FOLDER}/{stem}"
        source = self.env.doc2path(notebook) if notebook in self.env.found_docs else None
        if source is None:
            logger.warning(f"notebook-output: no notebook {notebook}.ipynb", location=self.get_location())
            return []
        self.env.note_dependency(str(source))
        _users(self.env).setdefault(self.env.docname, set()).add(notebook)
        node = notebook_output(notebook=notebook, tag=tag)
        self.set_source_info(node)
        return [node]


def _tagged_cell(doctree: nodes.document, tag: str) -> nodes.container | None:
    for cell in doctree.findall(nodes.container):
        if "cell" in cell.get("classes", []) and f"tag_{tag}" in cell.get("classes", []):
            return cell
    return None


class FillNotebookOutputs(SphinxPostTransform):
    """Replace each placeholder by the tagged cell's rendered output (before myst-nb picks mime types)."""

    default_priority = 1  # myst-nb's SelectMimeType runs at 4, the reference resolver at 10

    def run(self, **kwargs) -> None:
        for node in list(self.document.findall(notebook_output)):
            notebook, tag = node["notebook"], node["tag"]
            cell = _tagged_cell(self.env.get_doctree(notebook), tag)
            outputs = [c for c in (cell.children if cell else []) if "cell_output" in c.get("classes", [])]
            if not outputs or not outputs[0].children:
                why = "no cell carries that tag" if cell is None else "the cell has no output"
                logger.warning(f"notebook-output: {notebook} tag {tag!r}: {why}", location=node)
                node.replace_self(nodes.paragraph(text=f"(missing output: {notebook}, {tag})"))
                continue
            block = nodes.container(classes=["notebook-output"])
            block += copy.deepcopy(outputs[0])
            uri = self.app.builder.get_relative_uri(self.env.docname, notebook)
            line = nodes.paragraph(classes=["notebook-output-caption"])
            line += nodes.Text("Output of ")
            line += nodes.reference("", f"{notebook.split('/')[-1]}.ipynb", refuri=uri, internal=True)
            line += nodes.Text(", executed in this site's build.")
            block += line
            node.replace_self(block)


def _note_read(app, env, added, changed, removed) -> list[str]:
    env.notebook_output_reread = set(added) | set(changed)
    return []


def _pages_to_rewrite(app, env) -> list[str]:
    """Pages that show a notebook that was read again in this build."""
    reread = getattr(env, "notebook_output_reread", set())
    return sorted(page for page, shown in _users(env).items() if shown & reread and page not in reread)


def _purge(app, env, docname) -> None:
    _users(env).pop(docname, None)


def _merge(app, env, docnames, other) -> None:
    for page, shown in _users(other).items():
        if page in docnames:
            _users(env)[page] = shown


def setup(app):
    app.add_node(notebook_output)
    app.add_directive("notebook-output", NotebookOutput)
    app.add_post_transform(FillNotebookOutputs)
    app.connect("env-get-outdated", _note_read)
    app.connect("env-get-updated", _pages_to_rewrite)
    app.connect("env-purge-doc", _purge)
    app.connect("env-merge-info", _merge)
    return {"parallel_read_safe": True, "parallel_write_safe": True, "env_version": 1}
