"""Size and speed: bytes on disk and in memory, bits per weight, latency, peak memory, bandwidth.

Three different "sizes" are easy to confuse, so each has its own function:

* :func:`size_on_disk` -- what a saved model folder (or file) occupies;
* :func:`memory_by_dtype` / :func:`memory_by_kind` -- the bytes of a loaded model's tensors;
* :class:`PeakMemory` -- the most memory the process (or GPU) used while running some code.
"""

from __future__ import annotations

import dataclasses
import statistics
import threading
import time
from pathlib import Path

import torch

from quantlesson.errors import LessonError

KINDS = ("quantized linear", "linear", "embedding & head", "norm", "other")


def size_on_disk(path: str | Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    path = Path(path)
    if not path.exists():
        raise LessonError(f"{path} does not exist: save the model there first (model.save_pretrained(path)).")
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _own_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))


def _is_quantized(module: torch.nn.Module) -> bool:
    """A module that stores integer-typed weights (packed codes) is a quantized layer."""
    return any(not (t.is_floating_point() or t.is_complex()) for t in _own_tensors(module) if t.numel() > 1)


def kind_of(name: str, module: torch.nn.Module) -> str:
    """Classify a module by what its own tensors are for (one of :data:`KINDS`)."""
    if _is_quantized(module):
        return "quantized linear"
    if isinstance(module, torch.nn.Embedding) or name.endswith("lm_head"):
        return "embedding & head"
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if "norm" in type(module).__name__.lower():
        return "norm"
    return "other"


def _unique(pairs):
    seen = set()
    for key, tensor in pairs:
        if tensor.device.type == "meta":
            ident = id(tensor)
        else:
            ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if ident in seen:
            continue
        seen.add(ident)
        yield key, tensor


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def memory_by_dtype(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of the model's parameters and buffers, by dtype (shared tensors counted once)."""
    totals: dict[str, int] = {}
    pairs = ((str(t.dtype).removeprefix("torch."), t) for m in model.modules() for t in _own_tensors(m))
    for dtype, tensor in _unique(pairs):
        totals[dtype] = totals.get(dtype, 0) + _tensor_bytes(tensor)
    return totals


def memory_by_kind(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of the model's tensors by kind of module (see :data:`KINDS`), shared tensors counted once."""
    totals = dict.fromkeys(KINDS, 0)
    pairs = ((kind_of(n, m), t) for n, m in model.named_modules() for t in _own_tensors(m))
    for kind, tensor in _unique(pairs):
        totals[kind] += _tensor_bytes(tensor)
    return totals


def _logical_weights(module: torch.nn.Module) -> int:
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features) * int(module.out_features)
    raise LessonError(f"Cannot tell how many weights {type(module).__name__} stands for (no in_/out_features).")


def bits_per_weight(model: torch.nn.Module) -> float:
    """Effective bits per weight of the linear layers: everything they store (codes, scales, zeros) x 8 / weights.

    Uses the quantized linear layers where the model has any, else the plain
    ``nn.Linear`` layers other than the head (16 for bfloat16, 32 for float32).
    """
    quantized = [(n, m) for n, m in model.named_modules() if _is_quantized(m)]
    layers = quantized or [
        (n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
    ]
    if not layers:
        raise LessonError("The model has no linear layers to measure.")
    stored = sum(_tensor_bytes(t) for _, m in layers for t in _own_tensors(m) if t.numel() > 1)
    weights = sum(_logical_weights(m) for _, m in layers)
    return 8 * stored / weights


def decode_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights read to decode one token at batch 1: every tensor except embedding-table lookups.

    A head tied to the embedding reads that matrix once, so it counts once.
    """
    pairs = (
        (None, t)
        for m in model.modules()
        if not isinstance(m, torch.nn.Embedding)
        for t in _own_tensors(m)
    )
    return sum(_tensor_bytes(t) for _, t in _unique(pairs))


def roofline_tokens_per_s(bytes_per_token: float, bandwidth: float) -> float:
    """Upper bound on batch-1 decode speed: memory bandwidth (bytes/s) / bytes read per token."""
    return bandwidth / bytes_per_token


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    """Wait for the device to finish queued work (GPU kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(function, device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    function()
    _synchronize(device)
    return time.perf_counter() - start


@dataclasses.dataclass(frozen=True)
class Latency:
    """Prefill and decode timings, medians over repeats, with their spread (max - min)."""

    prompt_tokens: int
    new_tokens: int
    repeats: int
    prefill_ms: float
    prefill_spread_ms: float
    decode_ms_per_token: float
    decode_spread_ms: float
    device: str

    @property
    def decode_tokens_per_s(self) -> float:
        return 1000.0 / self.decode_ms_per_token

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens * 1000.0 / self.prefill_ms

    def __str__(self) -> str:
        return (
            f"prefill {self.prompt_tokens} tokens: {self.prefill_ms:.1f} ms (±{self.prefill_spread_ms / 2:.1f}); "
            f"decode: {self.decode_ms_per_token:.2f} ms/token = {self.decode_tokens_per_s:.1f} tokens/s "
            f"(±{self.decode_spread_ms / 2:.2f} ms) on {self.device}, median of {self.repeats}"
        )


def _generate(model, input_ids: torch.Tensor, new_tokens: int) -> int:
    """Greedy decoding of exactly ``new_tokens`` tokens (no early stop); return how many were made."""
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return output.shape[1] - input_ids.shape[1]


def _generate_exactly(model, input_ids: torch.Tensor, new_tokens: int) -> None:
    """:func:`_generate`, checked: a run that made a different number of tokens would time the wrong work."""
    made = _generate(model, input_ids, new_tokens)
    if made != new_tokens:
        raise RuntimeError(f"generate made {made} tokens, not {new_tokens}")


def latency(model, input_ids: torch.Tensor, new_tokens: int = 32, repeats: int = 5, warmup: int = 1) -> Latency:
    """Time prefill and decoding separately, at batch 1, greedy, exactly ``new_tokens`` new tokens.

    Prefill is one forward pass over the prompt. Decode time per token is
    ``(t(new_tokens) - t(1)) / (new_tokens - 1)``: generating one token costs a
    prefill, each further token one decode step. The device is synchronised
    around every timed call; ``warmup`` untimed runs come first.
    """
    if new_tokens < 2:
        raise LessonError("new_tokens must be at least 2 to time decoding apart from prefill.")
    if repeats < 1:
        raise LessonError("repeats must be at least 1.")
    device = next(model.parameters()).device
    input_ids = (input_ids[None] if input_ids.ndim == 1 else input_ids)[:1].to(device)

    def prefill():
        with torch.inference_mode():
            model(input_ids=input_ids)

    for _ in range(warmup):
        prefill()
        _generate(model, input_ids, new_tokens)
    prefills, one, full = [], [], []
    for _ in range(repeats):
        prefills.append(_timed(prefill, device))
        one.append(_timed(lambda: _generate_exactly(model, input_ids, 1), device))
        full.append(_timed(lambda: _generate_exactly(model, input_ids, new_tokens), device))
    per_token = [(f - o) / (new_tokens - 1) for f, o in zip(full, one)]
    return Latency(
        prompt_tokens=input_ids.shape[1],
        new_tokens=new_tokens,
        repeats=repeats,
        prefill_ms=1000 * statistics.median(prefills),
        prefill_spread_ms=1000 * (max(prefills) - min(prefills)),
        decode_ms_per_token=1000 * statistics.median(per_token),
        decode_spread_ms=1000 * (max(per_token) - min(per_token)),
        device=str(device),
    )


def _release_freed_memory() -> None:
    """Return freed heap memory to the operating system (glibc's ``malloc_trim``; elsewhere nothing)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


class PeakMemory:
    """Context manager: the peak memory while its block runs, and how long the block took.

    On a GPU, ``torch.cuda.max_memory_allocated`` (tensors only); on a CPU, the
    process's resident set size sampled every 5 ms. ``peak`` and ``increase``
    are in bytes, ``seconds`` is the block's wall-clock time. On Linux the C library first hands memory that was freed
    earlier back to the system (``malloc_trim``): otherwise new tensors reuse
    it and the block's memory would not show as an increase.

    >>> with PeakMemory() as memory:
    ...     x = torch.ones(1000, 1000)
    >>> memory.increase > 0
    True
    """

    def __init__(self, device: str | torch.device = "cpu", interval: float = 0.005):
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            from quantlesson.models import no_gpu_message

            raise LessonError(no_gpu_message("PeakMemory('cuda')") + " On a CPU, use PeakMemory() (resident memory).")
        self.interval = interval
        self.peak = 0
        self.start = 0
        self.seconds = 0.0

    def _rss(self) -> int:
        import psutil

        return psutil.Process().memory_info().rss

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            _release_freed_memory()
            self.start = self.peak = self._rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.seconds = time.perf_counter() - self._started
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.seconds = time.perf_counter() - self._started
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())

    @property
    def increase(self) -> int:
        return self.peak - self.start


def copy_bandwidth(device: str = "cpu", megabytes: int = 256, repeats: int = 5) -> float:
    """Measured memory bandwidth in bytes/s: a large tensor copy, bytes read + written, best of ``repeats``."""
    device_ = torch.device(device)
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device_)
    target = torch.empty_like(source)
    target.copy_(source)  # warm-up: touch every page
    best = min(_timed(lambda: target.copy_(source), device_) for _ in range(repeats))
    return 2 * source.numel() / best


# ---------------------------------------------------------------------------------------------
# Decode speed without per-token overhead: a static KV cache and one captured decode step
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DecodeSpeed:
    """Decode speed of one path at one batch size, with the memory-bandwidth bound beside it."""

    path: str
    batch: int
    new_tokens: int
    ms_per_step: float  # one decode step makes one token for each of ``batch`` sequences
    bytes_per_step: int  # bytes of weights read per step
    bandwidth: float | None = None  # measured device bandwidth, bytes/s
    same_tokens: int | None = None  # leading greedy tokens identical to plain generate's (of check_tokens)

    @property
    def tokens_per_s(self) -> float:
        """Tokens per second per sequence (batch 1: the speed a user sees)."""
        return 1000.0 / self.ms_per_step

    @property
    def roofline_tokens_per_s(self) -> float | None:
        """The bound: bandwidth / bytes read per step (``None`` without a measured bandwidth)."""
        return None if self.bandwidth is None else roofline_tokens_per_s(self.bytes_per_step, self.bandwidth)

    @property
    def roofline_fraction(self) -> float | None:
        bound = self.roofline_tokens_per_s
        return None if bound is None else self.tokens_per_s / bound

    def __str__(self) -> str:
        bound = "" if self.bandwidth is None else f", {100 * self.roofline_fraction:.1f} % of the {self.roofline_tokens_per_s:.0f} tokens/s bound"
        return (f"{self.path}, batch {self.batch}: {self.ms_per_step:.2f} ms/step = {self.tokens_per_s:.1f} tokens/s "
                f"per sequence ({self.bytes_per_step / 1e9:.2f} GB of weights per step{bound})")


def generate_speed(model, input_ids: torch.Tensor, new_tokens: int = 128, repeats: int = 3, bandwidth: float | None = None) -> DecodeSpeed:
    """Decode speed of plain ``model.generate`` (eager, dynamic cache, greedy) at batch 1, prefill subtracted."""
    timing = latency(model, input_ids, new_tokens=new_tokens, repeats=repeats, warmup=1)
    return DecodeSpeed("generate (eager)", 1, new_tokens, timing.decode_ms_per_token, decode_bytes(model), bandwidth)


class StaticDecoder:
    """Greedy decoding with a static KV cache: prefill once, then one fixed-shape step per token.

    Fixed shapes make the step capturable in a CUDA graph (``capture()``), which
    replays all of a step's kernels with one launch, removing Python and launch
    overhead; ``compile=True`` also fuses the step's kernels with ``torch.compile``.
    On a CPU the same steps run eagerly (that is how the tests check the logic).
    """

    def __init__(self, model, input_ids: torch.Tensor, max_new_tokens: int, compile: bool = False):
        from transformers import StaticCache

        self.model, self.device = model, input_ids.device
        batch, prompt = input_ids.shape
        self.cache = StaticCache(config=model.config, max_cache_len=prompt + max_new_tokens + 1)
        self.forward = torch.compile(model.forward, dynamic=False) if compile else model.forward
        with torch.inference_mode():
            logits = model(input_ids=input_ids, past_key_values=self.cache, use_cache=True,
                           cache_position=torch.arange(prompt, device=self.device)).logits
        self.next_ids = logits[:, -1].argmax(-1, keepdim=True)  # [batch, 1]: the first new token
        self.position = torch.tensor([prompt], device=self.device)  # [1]: where the next token goes
        self.graph = None
        self.steps_left = max_new_tokens - 1
        self.made = [self.next_ids.clone()]  # tokens made so far (prefill's, then warm-up steps')

    def _step(self) -> None:
        logits = self.forward(input_ids=self.next_ids, past_key_values=self.cache, use_cache=True,
                              cache_position=self.position).logits  # [batch, 1, vocab]
        self.next_ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
        self.position.add_(1)

    def capture(self, warmup: int = 3) -> None:
        """Warm up on a side stream, then record one step as a CUDA graph (uses ``warmup + 1`` positions)."""
        if self.device.type != "cuda":
            raise LessonError(
                "CUDA graphs need an NVIDIA GPU; on a CPU call step() without capture()."
            )
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(warmup):  # real decode steps: their tokens are kept
                self._use_one()
                self._step()
                self.made.append(self.next_ids.clone())
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self._step()  # recorded, not run: kernels are captured, nothing is computed

    def _use_one(self) -> None:
        if self.steps_left <= 0:
            raise LessonError("The static cache is full: create the StaticDecoder with a larger max_new_tokens.")
        self.steps_left -= 1

    def step(self) -> torch.Tensor:
        """Make one more token per sequence and return it ``[batch, 1]`` (a view: clone it to keep it)."""
        self._use_one()
        if self.graph is not None:
            self.graph.replay()
        else:
            with torch.inference_mode():
                self._step()
        return self.next_ids

    def tokens(self, n: int) -> torch.Tensor:
        """All tokens made so far plus ``n`` more, ``[batch, made + n]``."""
        self.made += [self.step().clone() for _ in range(n)]
        return torch.cat(self.made, dim=1)

    def time_steps(self, n: int) -> float:
        """Wall time of ``n`` consecutive steps, in ms per step (device synchronised before and after)."""
        return 1000 * _timed(lambda: [self.step() for _ in range(n)], self.device) / n


def static_decode_speed(
    model, input_ids: torch.Tensor, new_tokens: int = 128, graph: bool = True, compile: bool = False,
    check_tokens: int = 16, bandwidth: float | None = None, path: str | None = None,
) -> DecodeSpeed:  # fmt: skip
    """Decode speed with a static cache (and a captured CUDA graph), checked against ``generate``.

    Its greedy tokens are compared with plain ``generate``'s: ``same_tokens`` says how many of the first
    ``check_tokens`` agree (a near-tie in the logits can flip under different kernels; a wrong first
    token raises).
    """
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    with torch.inference_mode():
        expected = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                  max_new_tokens=check_tokens, min_new_tokens=check_tokens, pad_token_id=0)
    expected = expected[:, input_ids.shape[1]:]
    decoder = StaticDecoder(model, input_ids, max_new_tokens=check_tokens + 2 * new_tokens + 16, compile=compile)
    if graph:
        decoder.capture()
    made = decoder.tokens(max(0, check_tokens - len(decoder.made)))[:, :check_tokens]
    same = int((made == expected).all(dim=0).long().cumprod(0).sum())  # leading positions where all sequences agree
    if same == 0:
        raise RuntimeError("The static-cache decoder's first token differs from generate's: it is not decoding the same model.")
    decoder.time_steps(min(8, new_tokens))  # warm the replay
    ms = decoder.time_steps(new_tokens)
    name = path or ("static cache" + (" + CUDA graph" if graph else "") + (" + torch.compile" if compile else ""))
    return DecodeSpeed(name, input_ids.shape[0], new_tokens, ms, decode_bytes(model), bandwidth, same)
