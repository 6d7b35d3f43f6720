"""The committed results of both offline models (tools/model_results.py) are complete, green and fresh,
and every episode page shows them.

Each episode page draws its notebook's rows on the embedded model and on SmolLM2-135M-Instruct
(``{model-results}``, from ``_ext/lesson_results.py``). They come from a committed run: when a notebook or
the helper package changes, this test fails until the run is repeated.
"""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("model_results", ROOT / "tools" / "model_results.py")
model_results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(model_results)
sys.path.insert(0, str(ROOT / "_ext"))
import lesson_results  # noqa: E402

RUNS = json.loads(model_results.RUNS.read_text()) if model_results.RUNS.exists() else []
NOTEBOOKS = model_results.notebooks()
RERUN = "run it again: .venv/bin/python tools/model_results.py run {model} notebooks/{notebook}"


def run_of(notebook: Path, model: str) -> dict:
    rows = [r for r in RUNS if r["notebook"] == notebook.name and r["model"] == model]
    assert rows, f"{notebook.name} has no committed run on {model}: " + RERUN.format(model=model, notebook=notebook.name)
    return rows[0]


@pytest.mark.parametrize("model", model_results.MODELS)
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_ran_whole_on_both_models(notebook, model):
    run = run_of(notebook, model)
    assert run["passed"], f"{notebook.name} failed on {model} at cell {run.get('failed_cell')}: {run.get('error')}"


@pytest.mark.parametrize("model", model_results.MODELS)
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_committed_run_is_of_the_notebook_and_package_as_they_are_now(notebook, model):
    run, again = run_of(notebook, model), RERUN.format(model=model, notebook=notebook.name)
    assert run["notebook_hash"] == model_results.gpu_notebooks.notebook_hash(notebook), f"{notebook.name} changed: {again}"
    assert run["package_hash"] == model_results.gpu_notebooks.package_hash(notebook=notebook), (
        f"a module of src/quantlesson that {notebook.name} imports changed: {again}")


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_a_notebook_that_records_rows_has_them_committed_for_both_models(notebook):
    if "model=models.label()" not in notebook.read_text():  # 08 records the GPU speed of shape twins only
        pytest.skip(f"{notebook.name} records no result rows of the lesson's model")
    for model in model_results.MODELS:
        assert run_of(notebook, model)["tables"], f"{notebook.name} recorded no rows on {model}"
        assert list((model_results.FOLDER / model).glob(f"{notebook.stem}*.csv"))


def test_every_episode_page_with_rows_shows_both_models():
    shown = 0
    for notebook in NOTEBOOKS:
        keys, found = lesson_results.rows(notebook.stem)
        if not keys:  # 01 works on shape twins; 08's own rows are GPU speeds of shape twins
            continue
        page = (ROOT / "content" / f"{notebook.stem}.md").read_text()
        assert re.search(r"\{model-results\}\s+" + re.escape(notebook.stem), page), f"content/{notebook.stem}.md lacks its table"
        assert {model for (_, model) in found} == set(model_results.MODELS), f"{notebook.stem}: rows of one model only"
        shown += 1
    assert shown >= 7, "episodes 02-07 and 10 record quality rows: their tables are missing from results/models"


def test_the_page_table_aligns_rows_by_method_bits_and_group(tmp_path, monkeypatch):
    for model, perplexity in (("embedded", 104.0), ("smollm2-offline", 7.5)):
        (tmp_path / model).mkdir()
        (tmp_path / model / "99-x.csv").write_text(
            "episode,model,method,bits,group_size,size_mb,bits_per_weight,perplexity,kld,top1,quant_seconds,hardware\n"
            f"99-x,{model},RTN,4,64.0,,4.5,{perplexity},0.01,0.9,1.0,CPU\n"
            f"99-x,{model},GPTQ,4,64,,4.5,{perplexity},0.005,0.95,2.0,CPU\n"
            + (f"99-x,{model},AWQ,4,64,,4.5,{perplexity},0.006,0.94,2.0,CPU\n" if model == "embedded" else "")
            + "99-x,Llama (shape twin),int4,4,,,,,,,,GPU\n"
        )
    monkeypatch.setattr(lesson_results, "FOLDER", tmp_path)
    keys, found = lesson_results.rows("99-x")
    assert keys == [("RTN", "4", "64"), ("GPTQ", "4", "64"), ("AWQ", "4", "64")]  # 64.0 and 64 are one group size
    assert {m for (k, m) in found if k == keys[0]} == {"embedded", "smollm2-offline"}
    assert {m for (k, m) in found if k == keys[2]} == {"embedded"}  # a row one model lacks stays alone
    assert all("twin" not in k[0] for k in keys)  # speed rows of shape twins are not quality rows
    assert lesson_results.rows("99-x", match=["gptq"])[0] == [("GPTQ", "4", "64")]


def test_collect_copies_a_runs_tables_and_replaces_its_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(model_results, "FOLDER", tmp_path / "models")
    monkeypatch.setattr(model_results, "RUNS", tmp_path / "models" / "runs.json")
    results = tmp_path / "results" / "embedded"
    results.mkdir(parents=True)
    (results / "99-x.csv").write_text("episode,model,method,hardware\n99-x,embedded,RTN,CPU: test\n")
    record = tmp_path / "record.json"
    for passed in (False, True):  # a second run replaces the first one's row
        record.write_text(json.dumps([{"notebook": "99-x.ipynb", "model": "embedded", "passed": passed, "seconds": 1.0}]))
        model_results.collect(tmp_path / "results", record)
    runs = json.loads(model_results.RUNS.read_text())
    assert len(runs) == 1 and runs[0]["passed"] and runs[0]["hardware"] == "CPU: test" and runs[0]["tables"] == ["99-x.csv"]
    assert (tmp_path / "models" / "embedded" / "99-x.csv").read_text().startswith("episode,model")
    record.write_text(json.dumps([{"notebook": "99-x.ipynb", "model": "facebook/opt-125m", "passed": True}]))
    with pytest.raises(SystemExit, match="pages show only"):
        model_results.collect(tmp_path / "results", record)
