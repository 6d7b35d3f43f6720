"""Tag the notebook cells whose outputs the episode pages show ({notebook-output}); metadata only.

    python tools/tag_results.py            # apply the table below
A tag lives in the cell's metadata, so the GPU record's hash of the code is unchanged.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# notebook stem -> {tag: the first line of the cell's source}
TAGS = {
    "01-why-quantize": {"result-memory": "ax = memory.plot.bar(", "result-bound": "bandwidth = measure.copy_bandwidth("},
    "02-absmax-zeropoint": {"result-proof": "from compressed_tensors.quantization import QuantizationArgs",
                            "result-sweep": "ax = report.plot(report.read(results)"},
    "03-gptq": {"result-proof": "from compressed_tensors.quantization import QuantizationArgs",
                "result-sweep": "ax = report.plot(report.read(results)", "result-verdict": "pivot = sweep.pivot_table("},
    "04-awq": {"result-search": "fig, ax = plt.subplots(figsize=(6, 3))\nfor s in searches:",
               "result-proof": "# llm-compressor computes on a GPU", "result-sweep": "kld = sweep.pivot_table("},
    "05-bitsandbytes": {"result-proof": "packed, state = bnbF.quantize_4bit(", "result-saved": "work = models.work_folder("},
    "06-gguf": {"result-proof": "writer = gguf.GGUFWriter(", "result-sweep": "fig, ax = plt.subplots(figsize=(6.5, 4))",
                "result-verdict": "pairs = [(k, f\"{k} + imatrix\")"},
    "07-exl2": {"result-sweep": "fig, ax = plt.subplots(figsize=(6, 3.5))", "result-verdict": "uniform3 = sweep["},
    "07b-formats-2026": {"result-proof-minifloat": "patterns = torch.arange(256", "result-proof-scales": "from compressed_tensors.quantization import preset_name_to_scheme",
                         "result-proof-bytes": "import gguf\nimport numpy", "result-sweep": "def kld_of(", "result-fp8-speed": "fp8_run = pd.read_csv(",
                         "result-rotation": "kld = {}\nfor bits in (4, 3):"},
    "07c-exl3": {"result-codebook": "values = trellis.codebook(", "result-trellis": "layer = models.decoder_layers(model)[1]",
                 "result-trellis-plot": "fig, ax = plt.subplots(figsize=(6, 3.5))", "result-states": "import time",
                 "result-exl3-table": "from pathlib import Path\n\nfrom quantlesson import exl3, report",
                 "result-exl3-smollm2": "smol = Path(\"../results/models/smollm2-offline\")",
                 "result-exl3-smollm2-plot": "gguf_all = report.read(smol / \"06-gguf.csv\")",
                 "result-exl3-twins": "from quantlesson import exl2\n\nspeeds = []"},
    "08-which-method": {"result-families": "def family(", "result-best": "four_bit = quantized["},
    "08b-kernels": {"result-classes": "from transformers import BitsAndBytesConfig", "result-decompressed": "import copy",
                    "result-kernel-table": "runs = pd.concat(", "result-roofline": "best = kernelbench.best_decode(runs)",
                    "result-batches": "fig, axes = plt.subplots(", "result-verdict": "twin = twins[-1]"},
    "09b-use-it": {"result-gpus": "gpus = {", "result-reloaded": "eval_ids = data.evaluation_tokens(", "result-chat": "from quantlesson import chat"},
    "10-where-next": {"result-kv": "def kv_bytes_per_token(config, bits=16):"},
}


def apply(stem: str, tags: dict[str, str]) -> None:
    path = ROOT / "notebooks" / f"{stem}.ipynb"
    notebook = json.loads(path.read_text())
    for tag, start in tags.items():
        cells = [c for c in notebook["cells"] if c["cell_type"] == "code" and "".join(c["source"]).startswith(start)]
        if len(cells) != 1:
            sys.exit(f"{stem}: {len(cells)} cells start with {start!r}, for {tag}")
        for cell in notebook["cells"]:  # one cell per tag
            if tag in cell["metadata"].get("tags", []):
                cell["metadata"]["tags"].remove(tag)
        cells[0]["metadata"].setdefault("tags", []).append(tag)
    path.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    for stem, tags in TAGS.items():
        apply(stem, tags)
