"""Execute the lesson's notebooks into the site build's cache, several at once; `make html` runs this first.

    python tools/execute_notebooks.py [--jobs N]

myst-nb then finds every notebook in its jupyter-cache and only renders. A notebook already cached in its
current form is skipped; notebooks that run in every build (``execution_mode: force``, such as 08, which reads
the others' results) are left to myst-nb. Longest first, ``--jobs`` at a time (default: ``LESSON_JOBS``, else
one per two CPU cores, at least 1, at most 2), each kernel with the CPU cores divided among them
(``OMP_NUM_THREADS``), so two notebooks on two cores do not fight over threads.

The first failing notebook stops the run with its traceback, like the site build would.

Measured on the lesson's 2-core build machine (2026-12-03): 03 and 04 side by side, one thread each, took 260 s
together; one after the other, two threads each, 249 s. The notebooks are compute-bound, so two cores give no
gain, and the default there is one at a time. With four cores or more it runs two.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
# Seconds each took in a sequential build (2 cores, embedded model): the order in which they start.
LONGEST_FIRST = ["03-gptq", "04-awq", "07-exl2", "10-where-next", "07b-formats-2026", "02-absmax-zeropoint",
                 "05-bitsandbytes", "06-gguf", "09b-use-it", "01-why-quantize"]  # fmt: skip


def settings() -> tuple[str, int]:
    """The build's cache folder and cell timeout, from conf.py (so both runs agree)."""
    conf = runpy.run_path(str(ROOT / "conf.py"))
    return conf["nb_execution_cache_path"], int(conf["nb_execution_timeout"])


def pending(cache_path: str) -> list[Path]:
    """The notebooks myst-nb would execute: not cached in their current form, and not forced."""
    from jupyter_cache import get_cache

    cache = get_cache(cache_path)
    waiting = []
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        notebook = nbformat.read(path, nbformat.NO_CONVERT)
        if notebook.metadata.get("mystnb", {}).get("execution_mode") == "force":
            continue
        try:
            cache.match_cache_notebook(notebook)
        except KeyError:
            waiting.append(path)
    rank = {stem: i for i, stem in enumerate(LONGEST_FIRST)}
    return sorted(waiting, key=lambda p: rank.get(p.stem, -1))  # new notebooks first: their time is unknown


def execute(path: Path, timeout: int, threads: int):
    """Run one notebook in its own folder, as myst-nb does; the executed notebook, seconds and any traceback."""
    from jupyter_cache.executors.utils import single_nb_execution

    if threads:  # the kernel inherits it; one notebook at a time keeps the environment myst-nb would give it
        os.environ["OMP_NUM_THREADS"] = str(threads)
    notebook = nbformat.read(path, nbformat.NO_CONVERT)
    result = single_nb_execution(notebook, cwd=str(path.parent), allow_errors=False, timeout=timeout, meta_override=True)
    return notebook, result.time, result.exc_string if result.err else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cores = os.cpu_count() or 1
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("LESSON_JOBS", max(1, min(2, cores // 2)))))
    jobs = max(1, parser.parse_args().jobs)
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    cache_path, timeout = settings()
    waiting = pending(cache_path)
    if not waiting:
        print("[notebooks] every notebook is cached in its current form")
        return 0
    threads = max(1, cores // jobs)
    print(f"[notebooks] executing {len(waiting)} notebooks, {jobs} at a time" + (f", {threads} thread(s) each" if jobs > 1 else ""))
    cache, start = get_cache(cache_path), time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        running = {pool.submit(execute, path, timeout, threads if jobs > 1 else 0): path for path in waiting}
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                path = running.pop(future)
                notebook, seconds, error = future.result()
                if error:
                    print(f"[notebooks] {path.name} FAILED after {seconds:.0f} s:\n{error}", file=sys.stderr)
                    for other in running:
                        other.cancel()
                    return 1
                cache.cache_notebook_bundle(CacheBundleIn(notebook, str(path), data={"execution_seconds": seconds}),
                                            check_validity=False, overwrite=True)  # fmt: skip
                print(f"[notebooks] {path.name}: {seconds:.0f} s")
    print(f"[time] notebooks, {jobs} at a time: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
