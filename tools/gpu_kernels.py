"""Time the 4-bit kernel paths of a shape twin on a GPU (quantlesson.kernelbench) and write the rows to a CSV.

    python tools/gpu_kernels.py OUT.csv TWIN [--weights NAME ...] [--batches 1 4 16 64] [--compile 1 16] [--checks-only]

The notebook 08b-kernels runs the same function on the Llama-3.2-1B twin; this script measures the
Llama-3.1-8B twin, whose runs take longer than a notebook cell should. The CSV is rewritten after each
path (a path measured again replaces its rows), so a run cut short keeps what it measured. ``--checks-only``
runs only the correctness checks and writes them into the rows the CSV already holds for those paths. On the lesson's GPU machine: bash tools/gpu_kernels.sh.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

from quantlesson import kernelbench, speed


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("twin")
    parser.add_argument("--weights", nargs="+", default=list(kernelbench.WEIGHTS), choices=kernelbench.WEIGHTS)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--compile", nargs="+", type=int, default=[1, 16], dest="compile_batches")
    parser.add_argument("--checks-only", action="store_true")
    args = parser.parse_args(argv)
    bandwidth = speed.device_bandwidth()
    if bandwidth is None:
        return 1
    table = pd.read_csv(args.out) if args.out.exists() else pd.DataFrame(columns=kernelbench.COLUMNS)
    for name in args.weights:
        start = time.perf_counter()
        try:
            if args.checks_only:
                model = kernelbench.build(args.twin, name)
                checked = kernelbench.checks(args.twin, name, model)
                del model
                print(f"{name}: {checked}", flush=True)
                for column, value in checked.items():
                    table[column] = table[column].astype(float) if column in table else float("nan")
                    table.loc[table["weights"] == name, column] = value
            else:
                new = kernelbench.benchmark(args.twin, bandwidth, weights=(name,), batches=tuple(args.batches),
                                            compile_batches=tuple(args.compile_batches))
                table = pd.concat([table[table["weights"] != name], new], ignore_index=True)
        except Exception as error:  # one path failing must not lose the others
            print(f"{name}: FAILED: {type(error).__name__}: {error}", flush=True)
            continue
        table.reindex(columns=kernelbench.COLUMNS).to_csv(args.out, index=False)
        print(f"[{name}: {time.perf_counter() - start:.0f} s]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
