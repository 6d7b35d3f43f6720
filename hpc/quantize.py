"""Quantize a model with llm-compressor (GPTQ or AWQ) in a batch job, save it, and optionally measure it.

The batch scripts in ``hpc/<system>/`` call this file; it runs the same way on a laptop CPU
(slowly), on one GPU, and on several GPUs of one node::

    # one GPU (or a CPU): the model is loaded into CPU memory and llm-compressor's
    # sequential pipeline moves one decoder layer at a time to the GPU ("sequential onloading")
    python hpc/quantize.py --method gptq --model embedded --out /scratch/.../embedded-gptq

    # every GPU of a node: one process per GPU; the calibration samples are split
    # between the processes and GPTQ's layers are shared out among the GPUs
    torchrun --standalone --nproc-per-node 8 hpc/quantize.py --distributed --model ... --out ...

``--evaluate`` first scores the unquantized model, then reloads the saved checkpoint with
``device_map="auto"`` (spread over every visible GPU, as transformers does for a model too
large for one) and reports KL divergence, top-1 agreement and perplexity against it.
``--results FILE`` adds a row to the lesson's results table (``quantlesson.report``).

With ``HPC_DRY_RUN=1`` in the environment it only checks its arguments and prints what it
would do (``hpc/dryrun.py`` uses this to run the batch scripts without a cluster).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

METHODS = ("gptq", "awq")
DEFAULT_SCHEME = {"gptq": "W4A16", "awq": "W4A16_ASYM"}  # symmetric (scales only) / with zero-points
GROUP_SIZE = {"W4A16": 128, "W4A16_ASYM": 128, "W8A16": 128}  # llm-compressor's preset schemes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Quantize a causal language model with llm-compressor (GPTQ or AWQ) and save it.",
        epilog="Example: python hpc/quantize.py --method gptq --model embedded --out /tmp/embedded-gptq",
    )
    parser.add_argument("--method", choices=METHODS, default="gptq", help="quantization method (default: gptq)")
    parser.add_argument(
        "--model", default=None,
        help="'embedded', a Hugging Face Hub id or a local folder (default: $LESSON_MODEL, else SmolLM2-135M)",
    )
    parser.add_argument("--out", required=True, type=Path, help="folder to save the quantized model in")
    parser.add_argument(
        "--scheme", default=None,
        help="llm-compressor preset scheme (default: W4A16 for gptq, W4A16_ASYM for awq)",
    )
    parser.add_argument("--samples", type=int, default=128, help="number of calibration sequences (default: 128)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence (default: 512)")
    parser.add_argument(
        "--data", choices=("embedded", "hub"), default=None,
        help="calibration and evaluation text (default: embedded for the embedded model, else hub)",
    )
    parser.add_argument(
        "--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
        help="dtype to load the model in (auto: bfloat16 where the GPU supports it, float16 on older GPUs, "
        "float32 on a CPU)",
    )
    parser.add_argument("--awq-grid", type=int, default=20, help="AWQ: points in the scale search (default: 20)")
    parser.add_argument(
        "--distributed", action="store_true",
        help="one process per GPU, started by torchrun (llm-compressor's distributed oneshot)",
    )
    parser.add_argument("--evaluate", action="store_true", help="measure KL divergence, top-1 and perplexity")
    parser.add_argument(
        "--evaluate-only", action="store_true",
        help="do not quantize: score the model already saved in --out against --model, in one process, "
             "each spread over every visible GPU (device_map='auto')",
    )
    parser.add_argument("--eval-tokens", type=int, default=4096, help="evaluation tokens for --evaluate (default: 4096)")
    parser.add_argument("--results", type=Path, default=None, help="CSV results table to add a row to")
    args = parser.parse_args(argv)
    args.scheme = args.scheme or DEFAULT_SCHEME[args.method]
    if args.distributed and (args.evaluate or args.evaluate_only):
        parser.error("--evaluate runs in a single process: quantize with --distributed, then run --evaluate-only")
    if args.samples < 1 or args.seq_len < 8:
        parser.error("need --samples >= 1 and --seq-len >= 8")
    if args.distributed and "LOCAL_RANK" not in os.environ:
        parser.error("--distributed needs one process per GPU: start this file with torchrun --nproc-per-node N")
    return args


def choose_dtype(name: str):
    """The dtype to load the model in: bfloat16 only where the GPU computes it natively (not on a V100)."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():  # NVIDIA (CUDA) and AMD (ROCm) GPUs alike
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.float32


def recipe(method: str, scheme: str, awq_grid: int):
    """llm-compressor modifiers for the method (import paths of llm-compressor 0.14)."""
    if method == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        return [GPTQModifier(targets="Linear", scheme=scheme, ignore=["lm_head"])]
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    return [  # AWQ finds and folds the scales, then round-to-nearest quantizes with them
        AWQModifier(n_grid=awq_grid),
        QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"]),
    ]


def misfit_layers(model, group_size: int | None) -> list[str]:
    """Linear layers (but the head) whose inputs are no whole number of groups: llm-compressor refuses them."""
    import torch

    if not group_size:
        return []
    return [f"{name} ({module.in_features} inputs)" for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head") and module.in_features % group_size]  # fmt: skip


def rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def load_for_quantization(args, dtype):
    """The unquantized model, on the CPU (one process) or offloaded and shared by all ranks (--distributed)."""
    from quantlesson import models

    if not args.distributed:
        # device_map=None: everything in CPU memory; oneshot onloads one layer at a time to the GPU.
        return models.load(args.model, dtype=dtype, device="cpu")

    import torch.distributed as dist
    from compressed_tensors.offload import init_dist, load_offloaded_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    init_dist()  # reads RANK, LOCAL_RANK, WORLD_SIZE from torchrun and binds this process to its GPU
    rank, world = rank_and_world()
    if rank == 0:  # the embedded model is built on first use: let one process build it
        where, description = models.locate(args.model)
    dist.barrier()
    if rank != 0:
        where, description = models.locate(args.model)
    with load_offloaded_model():  # rank 0 reads the weights into CPU memory; the others share them
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, device_map="auto_offload")
    tokenizer = AutoTokenizer.from_pretrained(where)
    if rank == 0:
        print(f"Model: {args.model} -- {description}; {world} processes, {models.dtype_name(dtype)}", flush=True)
    return model, tokenizer


def calibration(tokenizer, args):
    """This process's calibration sequences (with --distributed: every world-size-th of the same set)."""
    from quantlesson import data

    dataset = data.calibration_dataset(tokenizer, n=args.samples, seq_len=args.seq_len)
    rank, world = rank_and_world()
    if world > 1:
        if args.samples < world:
            raise SystemExit(f"--samples {args.samples} is less than the {world} processes: give each at least one")
        dataset = dataset.shard(num_shards=world, index=rank, contiguous=False)
    return dataset


def reference_scores(args, dtype):
    """The unquantized model's log-probabilities on the evaluation text, on every visible GPU."""
    import gc

    from quantlesson import data, evaluate, models

    model, tokenizer = models.load(args.model, dtype=dtype, device_map="auto")
    ids = data.evaluation_tokens(tokenizer, max_tokens=args.eval_tokens)
    reference = evaluate.reference(model, ids, progress=False)
    del model
    gc.collect()
    return reference


def evaluate_saved(args, dtype, reference) -> dict[str, float]:
    """Reload the saved checkpoint with device_map="auto" and compare it with the reference."""
    from quantlesson import evaluate, models

    quantized, _ = models.load(str(args.out), dtype=dtype, device_map="auto")
    return evaluate.compare(quantized, reference, progress=False)


def evaluate_only(args) -> int:
    """Score a saved checkpoint (after a --distributed quantization) and add the scores to its summary."""
    from quantlesson import report

    if not (args.out / "config.json").is_file():
        raise SystemExit(f"--evaluate-only: no saved model in {args.out} (no config.json): quantize it first")
    dtype = choose_dtype(args.dtype)
    scores = evaluate_saved(args, dtype, reference_scores(args, dtype))
    summary_file = args.out / "quantize-summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {"model": args.model}
    summary.update(scores, evaluated_on=report.hardware(), eval_tokens=args.eval_tokens)
    summary_file.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.environ.get("HPC_DRY_RUN") == "1" and args.evaluate_only:
        print(f"Dry run (process 0 of 1): would score {args.out} against {args.model or '$LESSON_MODEL'} "
              f"on {args.eval_tokens} tokens, both spread over every visible GPU (device_map='auto')")
        return 0
    if os.environ.get("HPC_DRY_RUN") == "1":
        where = f"process {os.environ.get('RANK', 0)} of {os.environ.get('WORLD_SIZE', 1)}"
        print(f"Dry run ({where}): would quantize {args.model or '$LESSON_MODEL'} with {args.method.upper()} "
              f"{args.scheme}, {args.samples} x {args.seq_len} calibration tokens, and save it to {args.out}")
        return 0
    if args.model is None:
        from quantlesson import models

        args.model = models.chosen_model()
    os.environ.setdefault("LESSON_DATA", args.data or ("embedded" if args.model == "embedded" else "hub"))
    if args.evaluate_only:
        return evaluate_only(args)

    from llmcompressor import oneshot

    from quantlesson import compat, measure, report

    if args.method == "awq":
        compat.llmcompressor_awq_on_cpu()  # only changes anything on a machine without a GPU
    dtype = choose_dtype(args.dtype)
    reference = reference_scores(args, dtype) if args.evaluate else None

    model, tokenizer = load_for_quantization(args, dtype)
    misfit = misfit_layers(model, GROUP_SIZE.get(args.scheme))
    if misfit:  # before calibrating, not after minutes of it
        group = GROUP_SIZE[args.scheme]
        sys.exit(f"{args.scheme} quantizes in groups of {group} inputs, and {len(misfit)} linear layers are no whole number "
                 f"of groups (first: {misfit[0]}): llm-compressor would refuse them. Choose a model whose widths divide "
                 f"by {group}, such as Qwen/Qwen2.5-0.5B or a Llama (SmolLM2-135M's 576 do not), or quantize it in the "
                 "lesson's notebooks, which pick a group size that fits.")  # fmt: skip
    rank, world = rank_and_world()
    dataset = calibration(tokenizer, args)
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=recipe(args.method, args.scheme, args.awq_grid),
        max_seq_length=args.seq_len,
        num_calibration_samples=len(dataset),
    )
    seconds = time.perf_counter() - start
    model.save_pretrained(args.out, save_compressed=True)  # with --distributed, rank 0 writes the files
    if rank == 0:
        tokenizer.save_pretrained(args.out)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    if rank != 0:
        return 0

    summary = {
        "model": args.model, "method": args.method, "scheme": args.scheme,
        "samples": args.samples, "seq_len": args.seq_len, "processes": world,
        "dtype": str(dtype).removeprefix("torch."), "quantize_seconds": round(seconds, 1),
        "size_mb": round(measure.size_on_disk(args.out) / 1e6, 2), "hardware": report.hardware(),
    }  # fmt: skip
    if reference is not None:
        summary.update(evaluate_saved(args, dtype, reference))
    (args.out / "quantize-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    if args.results is not None:
        report.record(
            args.results, episode="09-hpc", model=args.model, method=f"{args.method.upper()} {args.scheme}",
            bits=int(args.scheme[1]), group_size=GROUP_SIZE.get(args.scheme), size_mb=summary["size_mb"],
            perplexity=summary.get("perplexity"), kld=summary.get("kld"), top1=summary.get("top1"),
            quant_seconds=summary["quantize_seconds"], calibration=f"{args.samples}x{args.seq_len}",
        )
    print(f"Saved {args.method.upper()} {args.scheme} model to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
