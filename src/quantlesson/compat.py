"""Workarounds for bugs in the libraries the lesson uses: each in one place, linked upstream, tested.

Every workaround here has a test in ``tests/test_compat.py`` that shows the
library still needs it; when that test starts failing, the library has been
fixed and the workaround can go.
"""

from __future__ import annotations

import os


def gptqmodel_cpu_workers() -> None:
    """Let GPTQModel quantize on a machine with two CPU cores. Call before ``import gptqmodel``.

    GPTQModel 7.6 sizes its CPU thread pool from the core count and then asks for two
    model-loading workers from it; on a 2-core machine the pool has one, and quantizing fails
    with ``ValueError: Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu'
    only has 1`` (raised in ``gptqmodel/utils/threadx.py``,
    https://github.com/ModelCloud/GPTQModel/blob/main/gptqmodel/utils/threadx.py). GPTQModel's
    own test suite sets ``GPTQMODEL_CPU_WORKERS=2`` for the same reason. Setting the variable
    to at least 2 (we use the core count) avoids it; a value you set yourself is kept.
    """
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
