"""Print what this job sees: Python, PyTorch, the lesson's libraries and every GPU, with what each GPU can run.

Run it first in every batch job: a job that sees no GPU, or the wrong PyTorch, should stop
before it queues hours of work::

    python hpc/check_env.py --require-gpu

``--require-gpu`` exits with status 1 when no GPU is visible, unless ``HPC_ALLOW_CPU=1``
is set (the dry run in ``hpc/dryrun.py`` sets it to run the scripts on a laptop).

The notes per GPU follow the sources cited on the lesson page *Running it on HPC*:
bfloat16 arithmetic from compute capability 8.0 (NVIDIA Ampere) and on AMD Instinct GPUs;
Marlin kernels from 8.0 in vLLM's hardware table; FP8 matrix multiplication from 8.9
(NVIDIA Ada, Hopper) and on MI300 (gfx942) or newer AMD GPUs, not on MI250X (gfx90a).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys

LIBRARIES = ("transformers", "accelerate", "datasets", "llmcompressor", "compressed-tensors", "quantlesson", "vllm")
AMD_FP8 = ("gfx94", "gfx95")  # MI300 series (gfx942) and MI350 series (gfx950)


def gpu_notes(capability: tuple[int, int] | None = None, arch: str | None = None) -> list[str]:
    """What a GPU of this NVIDIA compute capability, or this AMD architecture (``gfx90a``), can run."""
    if arch is not None:
        notes = ["ROCm: bfloat16 yes; Marlin (CUDA only) no; ExLlamaV3 no on data-centre GPUs (it builds for RDNA only)"]
        notes.append("FP8 matmul yes" if arch.startswith(AMD_FP8) else "FP8 matmul no (needs MI300 or newer)")
        return notes
    if capability is None:
        return []
    notes = ["bfloat16 yes" if capability >= (8, 0) else "bfloat16 not native: load models in float16"]
    notes.append("Marlin kernels yes" if capability >= (7, 5) else "Marlin kernels no (need compute capability 7.5; 8.0 in older vLLM)")
    notes.append("FP8 matmul yes" if capability >= (8, 9) else "FP8 matmul no (needs compute capability 8.9)")
    return notes


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def describe() -> tuple[list[str], int]:
    """Lines to print, and the number of GPUs visible."""
    import torch

    lines = [f"Python {platform.python_version()} at {sys.executable}"]
    backend = f"ROCm/HIP {torch.version.hip}" if torch.version.hip else f"CUDA {torch.version.cuda}"
    lines.append(f"torch {torch.__version__} ({backend if torch.cuda.is_available() else 'no GPU visible'})")
    lines.append("  " + ", ".join(f"{name} {version(name)}" for name in LIBRARIES))
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index in range(count):
        properties = torch.cuda.get_device_properties(index)
        memory = properties.total_memory / 2**30
        if torch.version.hip:
            arch = properties.gcnArchName.split(":")[0]
            kind, notes = f"AMD {arch}", gpu_notes(arch=arch)
        else:
            capability = (properties.major, properties.minor)
            kind, notes = f"compute capability {capability[0]}.{capability[1]}", gpu_notes(capability)
        lines.append(f"GPU {index}: {properties.name}, {kind}, {memory:.0f} GiB -- " + "; ".join(notes))
    for variable in ("HF_HOME", "QUANTLESSON_CACHE", "SLURM_JOB_ID", "SLURM_GPUS_ON_NODE"):
        lines.append(f"{variable}={os.environ.get(variable, '(not set)')}")
    return lines, count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the Python, PyTorch and GPUs this job sees.")
    parser.add_argument("--require-gpu", action="store_true", help="exit with status 1 if no GPU is visible")
    args = parser.parse_args(argv)
    lines, count = describe()
    print("\n".join(lines), flush=True)
    if args.require_gpu and count == 0:
        if os.environ.get("HPC_ALLOW_CPU") == "1":
            print("No GPU visible; continuing on the CPU because HPC_ALLOW_CPU=1.")
            return 0
        print("No GPU visible: check the #SBATCH GPU request (--gpus-per-node / --gres) and the partition.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
