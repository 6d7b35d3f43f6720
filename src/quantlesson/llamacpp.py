"""llama.cpp from Python: find its converter and tools, convert, quantize, and measure a GGUF model.

The usual way, with internet, is a clone of llama.cpp (``git clone
https://github.com/ggml-org/llama.cpp``, build with CMake) and its
``convert_hf_to_gguf.py``, ``llama-quantize``, ``llama-imatrix``, ``llama-cli`` and
``llama-bench``. Point ``LLAMA_CPP_DIR`` at the clone and put its ``build/bin`` on
``PATH``, and this module uses them.

Without a clone, it uses what the pinned ``llama-cpp-python`` package brings:
its source distribution vendors llama.cpp, converter included (extracted once
into the lesson's cache), and ``make env`` builds it with the command-line
tools (``CMAKE_ARGS="-DLLAMA_BUILD_TOOLS=ON -DLLAMA_TOOLS_INSTALL=ON -DLLAMA_BUILD_SERVER=ON ..."``),
which land in the environment's ``site-packages/bin``. :class:`Server` runs ``llama-server`` for one
``with`` block and talks to its OpenAI-compatible API with the standard library.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import types
from pathlib import Path

import torch

from quantlesson import embedded
from quantlesson.errors import LessonError

TOOLS = ("llama-quantize", "llama-imatrix", "llama-server")  # the programs the lesson runs; `make env` checks them
TYPES = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
         "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "IQ4_XS", "IQ4_NL", "IQ3_M", "IQ3_XXS", "IQ2_M", "IQ2_XS")  # fmt: skip
NEEDS_IMATRIX = ("IQ3_XXS", "IQ2_M", "IQ2_XS")  # llama-quantize refuses these without an importance matrix
CLONE_HINT = ("Clone llama.cpp (git clone https://github.com/ggml-org/llama.cpp), build it with CMake "
              "(cmake -B build && cmake --build build -j), and set LLAMA_CPP_DIR to the clone and put build/bin on PATH.")  # fmt: skip


def package_version() -> str:
    """The installed llama-cpp-python version (its source vendors the llama.cpp it was built from)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama_cpp_python")
    except PackageNotFoundError:
        raise LessonError("llama-cpp-python is not installed: run `make env`, or pip install -r requirements.txt.") from None


def source_folder() -> Path:
    """A llama.cpp source tree with ``convert_hf_to_gguf.py``: ``$LLAMA_CPP_DIR``, else the pinned package's copy."""
    if configured := os.environ.get("LLAMA_CPP_DIR"):
        folder = Path(configured)
        if not (folder / "convert_hf_to_gguf.py").is_file():
            raise LessonError(f"LLAMA_CPP_DIR={folder} has no convert_hf_to_gguf.py: point it at a clone of llama.cpp.")
        return folder
    version = package_version()
    folder = embedded.cache_root() / f"llama.cpp-{version}"
    if (folder / "convert_hf_to_gguf.py").is_file():
        return folder
    return _extract_converter(version, folder)


def _extract_converter(version: str, folder: Path) -> Path:
    """Fetch the pinned llama-cpp-python source distribution (pip's cache serves it again) and keep its converter."""
    downloads = embedded.cache_root() / "downloads"
    sdist = downloads / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                   f"llama_cpp_python=={version}", "-d", str(downloads)]  # fmt: skip
        if subprocess.run(command, capture_output=True, text=True).returncode != 0 or not sdist.is_file():
            raise LessonError(f"Could not download the llama-cpp-python {version} source to get its converter. {CLONE_HINT}")
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers()
                   if m.name.startswith(prefix) and m.name[len(prefix):].split("/")[0] in ("convert_hf_to_gguf.py", "conversion", "gguf-py")]  # fmt: skip
        for member in members:
            member.name = member.name[len(prefix):]
        archive.extractall(partial, members=members, filter="data")
    partial.replace(folder)
    return folder


def tool(name: str) -> str:
    """The path of a llama.cpp program (``llama-quantize``, ...): on ``PATH``, else the one ``make env`` built."""
    if found := shutil.which(name):
        return found
    built = Path(sysconfig.get_paths()["purelib"]) / "bin" / name
    if built.is_file():
        return str(built)
    raise LessonError(
        f"{name} was not found. `make env` builds llama-cpp-python with llama.cpp's tools; if you installed it "
        'yourself, reinstall with CMAKE_ARGS="-DLLAMA_BUILD_TOOLS=ON -DLLAMA_TOOLS_INSTALL=ON -DLLAMA_BUILD_SERVER=ON '
        '-DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAVA_BUILD=OFF" '
        f"pip install --force-reinstall --no-cache-dir llama-cpp-python=={package_version()}. Or: {CLONE_HINT}"
    )


def run(name: str, *arguments: str, timeout: int = 1800) -> str:
    """Run a llama.cpp program; return its output, or raise with the end of its log."""
    environment = dict(os.environ)
    libraries = Path(sysconfig.get_paths()["purelib"]) / "lib"  # where the pip-built tools' shared libraries are
    environment["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(libraries), environment.get("LD_LIBRARY_PATH")]))
    result = subprocess.run([tool(name), *arguments], capture_output=True, text=True, env=environment, timeout=timeout)
    if result.returncode != 0:
        raise LessonError(f"{name} failed (exit {result.returncode}):\n{(result.stdout + result.stderr)[-3000:]}")
    return result.stdout + result.stderr


_CONVERT = """
import sys
sys.path.insert(0, sys.argv.pop(1))  # the llama.cpp source folder
pre = sys.argv.pop(1)
import convert_hf_to_gguf
if pre:
    from conversion.base import TextModel
    TextModel.get_vocab_base_pre = lambda self, tokenizer: pre  # see convert()
convert_hf_to_gguf.main()
"""


def convert(model_folder: str | Path, out: str | Path, outtype: str = "f16", pre_tokenizer: str | None = None) -> Path:
    """Convert a transformers model folder to one GGUF file with llama.cpp's ``convert_hf_to_gguf.py``.

    The converter recognises a BPE tokenizer by hashing how it splits a test string, and refuses
    tokenizers it does not know ("BPE pre-tokenizer was not recognized"). A tokenizer trained for
    a new model, like the lesson's own, is never in its list; upstream's fix is to add it to
    ``convert_hf_to_gguf_update.py`` (https://github.com/ggml-org/llama.cpp/pull/6920). Here
    ``pre_tokenizer`` names the splitting rule instead (``"gpt-2"`` for a byte-level BPE with
    GPT-2's pattern, which is what the embedded model's tokenizer uses); ``None`` keeps the check.
    """
    model_folder, out = Path(model_folder), Path(out)
    if not (model_folder / "config.json").is_file():
        raise LessonError(f"{model_folder} is not a transformers model folder (no config.json): save the model there first.")
    if outtype not in ("f32", "f16", "bf16", "q8_0"):
        raise LessonError(f"outtype={outtype!r}: the converter writes f32, f16, bf16 or q8_0; quantize further with quantize().")
    partial = out.with_name(out.name + ".partial")
    command = [sys.executable, "-c", _CONVERT, str(source_folder()), pre_tokenizer or "",
               str(model_folder), "--outfile", str(partial), "--outtype", outtype]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise LessonError(f"convert_hf_to_gguf.py failed:\n{(result.stdout + result.stderr)[-3000:]}")
    partial.replace(out)
    return out


def quantize(source: str | Path, out: str | Path, kind: str, imatrix: str | Path | None = None, threads: int = 2) -> Path:
    """``llama-quantize [--imatrix FILE] SOURCE OUT KIND``, written to a temporary name first."""
    if kind not in TYPES:
        raise LessonError(f"Unknown GGUF type {kind!r}: choose one of {', '.join(TYPES)}.")
    if kind in NEEDS_IMATRIX and imatrix is None:
        raise LessonError(f"{kind} needs an importance matrix: compute one with importance_matrix() and pass imatrix=.")
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    extra = ["--imatrix", str(imatrix)] if imatrix else []
    try:
        run("llama-quantize", *extra, str(source), str(partial), kind, str(threads))
    except LessonError:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(out)
    return out


def importance_matrix(model: str | Path, text_file: str | Path, out: str | Path, context: int = 256, chunks: int = 64, threads: int = 2) -> Path:
    """``llama-imatrix``: the mean squared activation of every weight column on calibration text."""
    out = Path(out)
    run("llama-imatrix", "-m", str(model), "-f", str(text_file), "-o", str(out), "-c", str(context),
        "--chunks", str(chunks), "-t", str(threads), "--no-ppl")  # fmt: skip
    if not out.is_file():
        raise LessonError(f"llama-imatrix wrote no {out}.")
    return out


class LlamaCppModel(torch.nn.Module):
    """A GGUF model run by llama.cpp (through llama-cpp-python), callable like a transformers model.

    ``model(input_ids=ids).logits`` gives llama.cpp's logits for one sequence, so the
    lesson's :mod:`quantlesson.evaluate` measures a GGUF file exactly as it measures
    every other variant. One thread is fastest for a model this small.
    """

    def __init__(self, path: str | Path, context: int = 512, threads: int = 1):
        super().__init__()
        from llama_cpp import Llama

        if not Path(path).is_file():
            raise LessonError(f"No GGUF file at {path}.")
        self.path = Path(path)
        self.llm = Llama(model_path=str(path), n_ctx=context, n_batch=context, n_threads=threads,
                         logits_all=True, verbose=False)  # fmt: skip
        self._device = torch.nn.Parameter(torch.empty(0), requires_grad=False)  # evaluate reads the device from here

    def forward(self, input_ids: torch.Tensor, **_) -> types.SimpleNamespace:
        if input_ids.shape[0] != 1:
            raise LessonError("LlamaCppModel runs one sequence at a time (batch size 1).")
        tokens = input_ids[0].tolist()
        self.llm.reset()
        self.llm.eval(tokens)
        logits = torch.from_numpy(self.llm.scores[: len(tokens)].copy())  # [L, vocab]
        return types.SimpleNamespace(logits=logits[None])

    def close(self) -> None:
        self.llm.close()


def tensor_table(path: str | Path):
    """One row per tensor of a GGUF file: name, type, shape and bytes (read with the ``gguf`` package)."""
    import pandas as pd
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return pd.DataFrame([{"name": t.name, "type": t.tensor_type.name, "shape": tuple(int(n) for n in t.shape),
                          "elements": int(t.n_elements), "bytes": int(t.n_bytes)} for t in reader.tensors])  # fmt: skip


def bits_per_weight(path: str | Path, skip: tuple[str, ...] = ("token_embd", "output_norm", "_norm")) -> float:
    """Bits per weight of the quantized matrices of a GGUF file (embeddings and norms left out, as elsewhere in the lesson)."""
    table = tensor_table(path)
    table = table[~table["name"].str.contains("|".join(skip))]
    return 8 * table["bytes"].sum() / table["elements"].sum()


def decode_speed(model: LlamaCppModel, prompt: torch.Tensor, new_tokens: int = 64) -> float:
    """Greedy decode tokens per second after ``prompt`` (1-D ids), timed over exactly ``new_tokens`` steps."""
    import time

    llm = model.llm
    llm.reset()
    llm.eval(prompt.tolist())
    start = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])
    return new_tokens / (time.perf_counter() - start)


class Server:
    """llama.cpp's ``llama-server`` on this machine for one ``with`` block: an OpenAI-compatible endpoint.

        with llamacpp.Server("model-Q8_0.gguf") as server:
            reply = server.complete("def fibonacci(n):", max_tokens=32)

    It listens on 127.0.0.1 only, on a free port; it is stopped when the block ends, also on an error.
    Starting waits at most ``start_timeout`` seconds for ``/health``, and every request ``request_timeout``.
    """

    def __init__(self, path: str | Path, context: int = 512, threads: int = 2, start_timeout: float = 120.0,
                 request_timeout: float = 120.0):  # fmt: skip
        if not Path(path).is_file():
            raise LessonError(f"No GGUF file at {path}: convert and quantize a model first (llamacpp.convert, llamacpp.quantize).")
        self.path, self.context, self.threads = Path(path), context, threads
        self.start_timeout, self.request_timeout = start_timeout, request_timeout
        self.process: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """The base URL of the OpenAI-compatible API, as a client library wants it (``.../v1``)."""
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> Server:
        import socket
        import tempfile
        import time

        with socket.socket() as probe:  # a free port
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        environment = dict(os.environ)
        libraries = Path(sysconfig.get_paths()["purelib"]) / "lib"
        environment["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(libraries), environment.get("LD_LIBRARY_PATH")]))
        self._log = tempfile.TemporaryFile(mode="w+")
        command = [tool("llama-server"), "-m", str(self.path), "--host", "127.0.0.1", "--port", str(self.port),
                   "-c", str(self.context), "-t", str(self.threads), "-np", "1", "--no-webui"]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=environment)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.close()
                raise LessonError(f"llama-server stopped at start (exit {self.process.returncode}):\n{self._tail()}")
            try:
                if _request(f"http://127.0.0.1:{self.port}/health", None, timeout=2.0).get("status") == "ok":
                    return self
            except OSError:  # not listening yet, or 503 while the model loads
                pass
            time.sleep(0.2)
        log = self._tail()
        self.close()
        raise LessonError(f"llama-server did not answer /health within {self.start_timeout:.0f} s:\n{log}")

    def __exit__(self, *exc) -> None:
        self.close()

    def complete(self, prompt: str, max_tokens: int = 32) -> dict:
        """``POST /v1/completions``, greedy: the reply as JSON (text in ``["choices"][0]["text"]``)."""
        return _request(f"{self.url}/completions", {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
                        timeout=self.request_timeout)  # fmt: skip

    def chat(self, messages: list[dict], max_tokens: int = 32) -> dict:
        """``POST /v1/chat/completions`` with the GGUF file's chat template, greedy."""
        return _request(f"{self.url}/chat/completions", {"messages": messages, "max_tokens": max_tokens, "temperature": 0},
                        timeout=self.request_timeout)  # fmt: skip

    def close(self) -> None:
        """Stop the server (terminate, then kill after 10 s)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _tail(self) -> str:
        self._log.seek(0)
        return self._log.read()[-3000:]


def _request(url: str, payload: dict | None, timeout: float) -> dict:
    """GET (no payload) or POST JSON to ``url``; the JSON reply. Raises OSError when the server does not answer."""
    import json
    import urllib.request

    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


if __name__ == "__main__":  # `python -m quantlesson.llamacpp`: `make env` keeps the converter, so notebooks need no network
    print(f"llama.cpp converter: {source_folder() / 'convert_hf_to_gguf.py'}")
    for program in TOOLS:
        print(f"{program}: {tool(program)}")  # a LessonError that says how to build it, if it is missing
