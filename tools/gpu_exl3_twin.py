"""Convert a shape twin to EXL3 4.0 bpw and time its decode at batch 1 (quantlesson.exl3.twin_speed).

    python tools/gpu_exl3_twin.py results/gpu-exl3.csv                    # the Llama-3.2-1B twin, converted whole
    python tools/gpu_exl3_twin.py results/gpu-exl3.csv Llama-3.1-8B 2     # 2 converted layers, repeated to 32

The same as 07c-exl3's twin cell (LESSON_CONVERT_TWIN=1), run apart from the notebook so that a run cut
short still keeps the notebook's record. On the lesson's GPU machine, after tools/gpu_run.sh installed exllamav3.
"""

from __future__ import annotations

import sys

from quantlesson import exl3, models, report

if __name__ == "__main__":
    if not exl3.available():
        sys.exit(1)
    name = sys.argv[2] if len(sys.argv) > 2 else "Llama-3.2-1B"
    layers = int(sys.argv[3]) if len(sys.argv) > 3 else None
    _, tokenizer = models.load(device="cpu")  # any tokenizer: the twin's text is noise
    twin = exl3.twin_speed(name, tokenizer, models.work_folder(f"07c-exl3-twin-{name}"), bits=4.0, layers=layers)
    print(name, {key: round(value, 3) for key, value in twin.items()}, flush=True)
    report.record(sys.argv[1], **exl3.twin_row(name, twin))
