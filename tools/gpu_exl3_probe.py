"""Does ExLlamaV3 run a Llama whose hidden size is not a multiple of 128, and does exl3.save's widening mend it?

    python tools/gpu_exl3_probe.py OUT.json

The evidence for ``quantlesson.exl3.pad_hidden_size``. On the SmolLM2-135M shape twin (hidden
size 576, random weights, float16), each of two folders is loaded by ExLlamaV3 unconverted and run (a 512-token
forward pass compared with transformers on the same GPU and tokens), and converted at
4.0 bpw: first the folder as ``save_pretrained`` writes it, then as ``exl3.save`` writes it (widened to 640).
Each step's outcome (or its error, last lines) goes to OUT.json. The widened conversion is then decoded at
batch 1 twice: as ExLlamaV3 loads it (k_proj and v_proj fused) and after ``exl3.unfuse_narrow_kv``, the evidence
for that workaround. On the lesson's GPU machine, after tools/gpu_run.sh installed exllamav3 (EXL3=1).
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import traceback
from pathlib import Path

import torch

from quantlesson import exl3, models


def relative_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return ((logits.float() - reference.float()).norm() / reference.float().norm()).item()


@contextlib.contextmanager
def without(name: str):
    """Switch off one of the lesson's own steps in quantlesson.exl3 (``check_folder``, ``unfuse_narrow_kv``) meanwhile."""
    step = getattr(exl3, name)
    setattr(exl3, name, lambda *_: None)
    try:
        yield
    finally:
        setattr(exl3, name, step)


def failure(error: Exception) -> dict:
    """What a step that failed records: the error and the end of its traceback."""
    return {"error": f"{type(error).__name__}: {error}"[:500], "traceback": traceback.format_exc()[-2500:]}


def run_unconverted(folder: Path, tokens: torch.Tensor, reference: torch.Tensor) -> dict:
    """Load ``folder`` in ExLlamaV3 without the lesson's own check and run a forward pass."""
    try:
        with without("check_folder"):  # let a 576-wide folder reach ExLlamaV3
            runner = exl3.ExLlamaV3Model(folder, max_tokens=1024)
        logits = runner(tokens[None].cuda()).logits[0]
        del runner
        return {"forward": "ran", "relative_error_vs_transformers": relative_error(logits, reference)}
    except Exception as error:  # noqa: BLE001  (the point is to record what fails)
        return failure(error)


def decode(folder: Path, prompt: torch.Tensor, fused_kv: bool) -> dict:
    """Batch-1 decode speed of ``folder`` with ExLlamaV3's fused k/v projection kept or unfused, and what it printed."""
    try:
        with without("unfuse_narrow_kv") if fused_kv else contextlib.nullcontext():
            runner = exl3.ExLlamaV3Model(folder, max_tokens=1024)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            tokens_per_s = runner.decode_speed(prompt, new_tokens=128)
        del runner
        return {"tokens_per_s": tokens_per_s, "printed": printed.getvalue()[-500:]}
    except Exception as error:  # noqa: BLE001  (the point is to record what fails)
        return failure(error)


def convert_raw(folder: Path, work: Path) -> dict:
    """ExLlamaV3's converter at 4.0 bpw on ``folder``, called directly (no lesson check in front)."""
    out = work / f"{folder.name}-exl3"
    command = [sys.executable, "-m", "exllamav3.conversion.convert_model", "-i", str(folder), "-o", str(out),
               "-w", str(work / f"{folder.name}-job"), "-b", "4.0", "-hb", "6", "-cr", "8", "-cc", "256"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    text = result.stdout + result.stderr
    converted = result.returncode == 0 and (out / "config.json").exists() and "!! Error" not in result.stdout
    return {"converted": converted, "exit": result.returncode, "tail": text[-2500:], "folder": str(out)}


if __name__ == "__main__":
    if not exl3.available():
        sys.exit(1)
    out_path = Path(sys.argv[1])
    work = models.work_folder("exl3-probe")
    _, tokenizer = models.load(device="cpu")  # any tokenizer: the twin's text is noise
    twin = models.twin("SmolLM2-135M", dtype=torch.float32, device="cpu")
    torch.manual_seed(1)
    tokens = torch.randint(0, min(tokenizer.vocab_size, twin.config.vocab_size), (512,))
    with torch.no_grad():
        reference = twin.half().cuda()(tokens[None].cuda()).logits[0].float().cpu()
        twin = twin.float().cpu()
    from importlib.metadata import version

    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "exllamav3": version("exllamav3"),
              "model": "SmolLM2-135M shape twin (random weights), float16",
              "note": "relative_error_vs_transformers: the logits' relative error against transformers in float16 on the "
                      "same 512 random tokens (random weights: a converted model's figure says little about EXL3's quality, "
                      "see the SmolLM2 rows in gpu-exl3.csv). decode_*: 128 greedy tokens after a 64-token prompt, batch 1."}
    raw = work / "saved"
    twin.half().save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    twin = twin.float()
    padded = exl3.save(twin, tokenizer, work / "widened", dtype=torch.float16)
    for name, folder in (("save_pretrained", raw), ("exl3.save", padded)):
        report[name] = {"hidden_size": json.loads((folder / "config.json").read_text())["hidden_size"]}
        report[name]["unconverted"] = run_unconverted(folder, tokens, reference.cuda())
        report[name]["convert_4.0"] = convert_raw(folder, work)
        if report[name]["convert_4.0"]["converted"]:
            converted = Path(report[name]["convert_4.0"]["folder"])
            report[name]["converted_4.0"] = run_unconverted(converted, tokens, reference.cuda())
            for fused in (True, False):
                report[name][f"decode_4.0_{'fused' if fused else 'unfused'}_kv"] = decode(converted, tokens[:64], fused)
        print(name, json.dumps({k: v for k, v in report[name].items()}, indent=1)[:3000], flush=True)
        out_path.write_text(json.dumps(report, indent=1))
