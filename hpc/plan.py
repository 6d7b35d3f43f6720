"""Before you queue: how much GPU memory a model needs, how many GPUs that is, and which tensor-parallel sizes work.

Pure arithmetic on a model's config (no download, no GPU)::

    python hpc/plan.py --model llama-3.3-70b
    python hpc/plan.py --model embedded --tensor-parallel 4
    python hpc/plan.py --model /scratch/.../my-model/config.json --gpu-memory 64

Assumptions, each stated on the lesson page with its source:

* weights in bfloat16 take 2 bytes per parameter; W4A16 with groups of 128 stores 4 bits per
  weight of every linear layer plus one 16-bit scale per group (4.125 bits), while embeddings,
  norms and ``lm_head`` stay in 16 bits (llm-compressor's ``ignore=["lm_head"]``);
* inference needs up to 20 % more than the weights (CSC's machine-learning guide, after
  EleutherAI's *Transformer Math 101*); a long context needs more for the KV cache;
* tensor parallelism splits attention heads and the columns of every linear layer: the number of
  attention heads must divide by it, and each GPU's share of a row-parallel layer's inputs
  (``o_proj``, ``down_proj``) must be whole quantization groups (vLLM: "The input size is not
  aligned with the quantized weight shape").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OVERHEAD = 0.20  # CSC: "for inference there's up to 20% overhead"
GPU_MEMORY_GB = {  # per GPU, as CSC's LLM guide lists them (https://docs.csc.fi/support/tutorials/ml-llm/)
    "V100 (Puhti)": 32,
    "A100 (Mahti)": 40,
    "MI250X GCD (LUMI)": 64,
    "GH200 (Roihu)": 96,
}
PRESETS = {
    # https://huggingface.co/meta-llama/Llama-3.3-70B-Instruct/blob/main/config.json
    "llama-3.3-70b": {
        "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False,
    },
}  # fmt: skip
SCHEMES = {"bf16": (16, None), "W8A16": (8, 128), "W4A16": (4, 128)}  # (bits, group size) of linear layers


def load_config(name: str) -> dict:
    """A model config by name: a preset, 'embedded', a quantlesson shape twin, or a path to config.json."""
    if name in PRESETS:
        return dict(PRESETS[name])
    if name == "embedded":
        import dataclasses

        from quantlesson.embedded import Recipe

        recipe = dataclasses.asdict(Recipe())
        config = {key: recipe[key] for key in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads")}  # fmt: skip
        return config | {"tie_word_embeddings": True}
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if path.exists():
        return json.loads(path.read_text())
    from importlib import resources

    twin = resources.files("quantlesson.twins").joinpath(f"{name}.json")
    if twin.is_file():
        return json.loads(twin.read_text())
    known = sorted(PRESETS) + ["embedded", "SmolLM2-135M", "Llama-3.2-1B", "Llama-3.1-8B"]
    raise SystemExit(f"Unknown model {name!r}: give a path to a config.json or one of {known}")


def shapes(config: dict) -> dict[str, int]:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return {
        "hidden": config["hidden_size"], "intermediate": config["intermediate_size"],
        "layers": config["num_hidden_layers"], "heads": heads,
        "kv_heads": config.get("num_key_value_heads", heads), "head_dim": head_dim, "vocab": config["vocab_size"],
    }  # fmt: skip


def parameter_counts(config: dict) -> dict[str, int]:
    """Parameters of a Llama-style decoder: linear layers (quantized) and the rest (kept in 16 bits)."""
    s = shapes(config)
    attention = s["hidden"] * s["heads"] * s["head_dim"] * 2 + s["hidden"] * s["kv_heads"] * s["head_dim"] * 2
    mlp = 3 * s["hidden"] * s["intermediate"]
    linear = s["layers"] * (attention + mlp)
    embeddings = s["vocab"] * s["hidden"] * (1 if config.get("tie_word_embeddings", False) else 2)
    norms = s["hidden"] * (2 * s["layers"] + 1)
    return {"linear": linear, "other": embeddings + norms, "total": linear + embeddings + norms}


def weight_bytes(config: dict, scheme: str = "bf16") -> float:
    """Bytes of weights: linear layers at the scheme's bits (plus a 16-bit scale per group), the rest in 16 bits."""
    bits, group = SCHEMES[scheme]
    counts = parameter_counts(config)
    bits_per_weight = bits + (16 / group if group else 0)
    return counts["linear"] * bits_per_weight / 8 + counts["other"] * 2


def tensor_parallel_problems(config: dict, tp: int, group_size: int | None = 128) -> list[str]:
    """Why a tensor-parallel size cannot split this model (empty if it can)."""
    s = shapes(config)
    problems = []
    if s["heads"] % tp:
        problems.append(f"{s['heads']} attention heads do not divide by {tp}")
    if s["kv_heads"] % tp and tp % s["kv_heads"]:
        problems.append(f"{s['kv_heads']} key/value heads and {tp} GPUs: neither divides the other")
    if group_size:
        for name, width in (("o_proj", s["heads"] * s["head_dim"]), ("down_proj", s["intermediate"])):
            if width % tp or (width // tp) % group_size:
                problems.append(f"{name}: {width} inputs / {tp} GPUs is not a whole number of groups of {group_size}")
    return problems


def gpus_needed(config: dict, scheme: str, gpu_memory_gb: float, overhead: float = OVERHEAD, largest: int = 64) -> int | None:
    """The smallest power-of-two tensor-parallel size whose GPUs hold the weights plus the overhead."""
    need_gb = weight_bytes(config, scheme) * (1 + overhead) / 1e9
    group = SCHEMES[scheme][1] if scheme != "bf16" else None
    tp = 1
    while tp <= largest:
        if need_gb / tp <= gpu_memory_gb and not tensor_parallel_problems(config, tp, group):
            return tp
        tp *= 2
    return None


def amount(value: float, unit: str = "B") -> str:
    """1.2e9 -> '1.2 GB', 3.4e6 -> '3.4 MB'; with unit='': '1.2 billion', '3.4 million'."""
    for scale, prefix, word in ((1e9, "G", "billion"), (1e6, "M", "million"), (1e3, "k", "thousand")):
        if value >= scale:
            return f"{value / scale:.1f} {prefix}{unit}" if unit else f"{value / scale:.1f} {word}"
    return f"{value:.0f} {unit}".strip()


def report(name: str, config: dict, gpu_memory: dict[str, float]) -> list[str]:
    counts = parameter_counts(config)
    lines = [f"{name}: {amount(counts['total'], '')} parameters, {amount(counts['linear'], '')} of them in linear layers"]
    for scheme in SCHEMES:
        weights = weight_bytes(config, scheme)
        group = SCHEMES[scheme][1] if scheme != "bf16" else None
        misfit = tensor_parallel_problems(config, 1, group)  # on one GPU: only the group size can fail
        needed = ", ".join(f"{gpu} {gpus_needed(config, scheme, gb) or 'too large'}" for gpu, gb in gpu_memory.items())
        lines.append(
            f"  {scheme:5s} weights {amount(weights):>8s}, +{OVERHEAD:.0%}: {amount(weights * (1 + OVERHEAD)):>8s}"
            + (f" -> does not fit the scheme: {'; '.join(misfit)}" if misfit else f" -> GPUs needed: {needed}")
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GPU memory and tensor-parallel sizes for a model, from its config.")
    parser.add_argument("--model", default="llama-3.3-70b", help="preset, 'embedded', shape twin or config.json path")
    parser.add_argument("--gpu-memory", type=float, default=None, help="GB per GPU (default: the four GPUs of the lesson)")
    parser.add_argument("--tensor-parallel", type=int, default=None, help="check whether this TP size can split the model")
    parser.add_argument("--group-size", type=int, default=128, help="quantization group size for the TP check")
    args = parser.parse_args(argv)
    config = load_config(args.model)
    gpus = {"your GPU": args.gpu_memory} if args.gpu_memory else GPU_MEMORY_GB
    print("\n".join(report(args.model, config, gpus)))
    if args.tensor_parallel:
        problems = tensor_parallel_problems(config, args.tensor_parallel, args.group_size)
        verdict = "; ".join(problems) if problems else "fits"
        print(f"--tensor-parallel-size {args.tensor_parallel} with groups of {args.group_size}: {verdict}")
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
