"""quantlesson: the helper package of the lesson *Quantizing large language models*.

Modules, each with one job:

* :mod:`quantlesson.models` -- load a model (hub or embedded), shape twins of real models
* :mod:`quantlesson.data` -- calibration and evaluation text
* :mod:`quantlesson.measure` -- size on disk, memory by dtype and kind, bits per weight, latency
* :mod:`quantlesson.evaluate` -- perplexity, KL divergence, top-1 agreement
* :mod:`quantlesson.report` -- the lesson's results table and its plots
* :mod:`quantlesson.scratch` -- the quantizers written from scratch, one short module per method
* :mod:`quantlesson.compat` -- each workaround for a library bug, linked to its upstream issue
"""

import os

# Reproducible CPU arithmetic: MKL and OpenMP must not change their thread counts on their own
# (they read these only when torch is first imported, so import quantlesson before torch).
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
os.environ.setdefault("OMP_DYNAMIC", "FALSE")

from quantlesson.errors import LessonError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["LessonError", "__version__"]
