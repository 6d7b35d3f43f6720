"""The versions the lesson was built and tested with, as a Markdown table.

``python -m quantlesson.versions`` prints it; the build writes it to
``_static_/versions.md``, which the setup page and the quick reference include.
"""

from __future__ import annotations

import platform
from importlib import metadata

PACKAGES = (
    "torch", "transformers", "accelerate", "datasets", "llmcompressor", "compressed-tensors",
    "gptqmodel", "bitsandbytes", "optimum", "gguf", "llama_cpp_python", "exllamav2", "peft", "hqq",
    "lm_eval", "numpy", "sphinx", "sphinx-lesson", "myst-nb",
)  # fmt: skip


def installed(packages=PACKAGES) -> dict[str, str]:
    """Installed version of each package ("not installed" where absent)."""
    versions = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def markdown_table(versions: dict[str, str]) -> str:
    """A two-column Markdown table."""
    lines = ["| package | version |", "| --- | --- |"]
    lines += [f"| {name} | {version} |" for name, version in versions.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(installed()), end="")
