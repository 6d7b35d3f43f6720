"""Print how long each notebook took to execute in the last site build (from its jupyter-cache).

The episodes aim at 5 minutes or less on two CPU cores; this prints the figures (``make html`` calls
it), it does not enforce them.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 300


def main() -> int:
    import nbformat
    from jupyter_cache import get_cache

    cache = get_cache(runpy.run_path(str(ROOT / "conf.py"))["nb_execution_cache_path"])
    total = 0.0
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        notebook = nbformat.read(path, nbformat.NO_CONVERT)
        try:
            record = cache.match_cache_notebook(notebook)
        except KeyError:
            print(f"[time] notebook {path.stem}: not in the cache (runs in every build, or not executed)")
            continue
        seconds = float(record.data.get("execution_seconds", 0.0))
        total += seconds
        note = "" if seconds <= BUDGET_S else f"  (over the {BUDGET_S} s aim)"
        print(f"[time] notebook {path.stem}: {seconds:.0f} s{note}")
    print(f"[time] notebooks from the cache, together: {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
