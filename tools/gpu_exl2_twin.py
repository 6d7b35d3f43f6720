"""Convert a few layers of a shape twin to EXL2 4.0 bpw, repeat them to the real depth, and time its decode at batch 1.

    python tools/gpu_exl2_twin.py results/gpu-exl2.csv Llama-3.1-8B 2     # 2 converted layers, repeated to 32

Episode 7's twin cell (CONVERT_TWIN) converts the Llama-3.2-1B twin whole, in about five minutes on the H200. The
Llama-3.1-8B twin would take far longer, so this script converts only its first layers, with the cell's settings
(measured and quantized on 2 x 64 tokens), and repeats them (``quantlesson.exl3.repeat_layers``: EXL2, like EXL3,
names its tensors by layer). Decoding then reads the same bytes through the same kernels as a model converted whole;
the twin's weights are random, so only the speed means anything. Its row sits beside the EXL3 twin's row of
tools/gpu_exl3_twin.py in episode 7c's speed table. On the lesson's GPU machine, after tools/gpu_run.sh installed
exllamav2: bash tools/gpu_run.sh tool tools/gpu_exl2_twin.py results/gpu-exl2.csv Llama-3.1-8B 2
"""

from __future__ import annotations

import sys
import time

import torch
from transformers import AutoModelForCausalLM

from quantlesson import data, exl2, exl3, measure, models, report

if __name__ == "__main__":
    if not exl2.available():
        sys.exit(1)
    table, name, layers = sys.argv[1], sys.argv[2], int(sys.argv[3])
    _, tokenizer = models.load(device="cpu")  # any tokenizer: the twin's text is noise
    work = models.work_folder(f"07-exl2-twin-{name}")
    config = models.twin_config(name)
    depth = config.num_hidden_layers
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    twin = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()  # random weights, on the CPU
    twin.save_pretrained(work / "hf")
    tokenizer.save_pretrained(work / "hf")
    del twin
    cal = exl2.write_calibration(data.calibration_texts(tokenizer, n=64, seq_len=256), work / "calibration.parquet")
    start = time.perf_counter()
    measurement = exl2.measure(work / "hf", work, cal, length=64, rows=2)
    folder = exl2.convert(work / "hf", work, 4.0, measurement, cal, length=64, rows=2)
    print(f"{name}: {layers} layers converted in {time.perf_counter() - start:.0f} s", flush=True)
    exl3.repeat_layers(folder, depth)
    size = measure.size_on_disk(folder)
    runner = exl2.ExLlamaV2Model(folder, max_seq_len=2048)
    tokens_per_s = runner.decode_speed(torch.arange(64), new_tokens=256)
    gpu_bytes = exl2.gpu_bytes_per_token(size, models.twin_config(name))  # the embedding table stays in CPU memory
    bound = measure.copy_bandwidth("cuda") / gpu_bytes
    print(f"{name} twin, EXL2 4.0 bpw, batch 1: {tokens_per_s:.0f} tokens/s; bound {bound:.0f} tokens/s for the "
          f"{gpu_bytes / 1e9:.2f} GB read per token ({tokens_per_s / bound:.1%}) on {torch.cuda.get_device_name()}")
    report.record(table, episode="07-exl2", model=f"{name} (shape twin)", bits=4, bits_per_weight=4.0,
                  method=f"EXL2 4.0 bpw, ExLlamaV2 dynamic generator, batch 1 ({layers} converted layers repeated to {depth})",
                  size_mb=round(size / 1e6, 1), decode_tok_s=round(tokens_per_s, 1))  # fmt: skip
