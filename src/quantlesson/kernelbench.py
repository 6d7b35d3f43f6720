"""Which kernel runs a quantized model, and the 4-bit kernels side by side on real shapes.

"Why isn't my 4-bit model faster?" has two halves. The first is overhead: a plain
``generate`` loop spends more time launching kernels than reading weights
(:mod:`quantlesson.speed` measures it). The second is the kernel: a 4-bit matrix
multiply must unpack, scale and multiply as fast as the GPU can read, and not every
kernel does. This module puts several kernels on the same shape twin:

* ``bfloat16``: the unquantized model, the baseline;
* ``int4 tinygemm``: PyTorch's own int4 kernel (:mod:`quantlesson.kernels`);
* ``int4 gemlite``: gemlite's Triton kernels (a GEMV for one row of activations, GEMMs for more)
  with the *same* 4-bit codes (round-to-nearest, symmetric, a bfloat16 scale per group);
* ``int4 tinygemm, head int4`` and ``int4 gemlite, head int4``: the same, with the head quantized too;
* ``NF4 bitsandbytes``: bitsandbytes' ``Linear4bit`` (NF4, double quant), as transformers loads it;
* ``no matmuls (floor)``: every linear layer replaced by one that only returns zeros. What is left
  (attention, norms, the cache, launches) is the floor under any kernel's step time.

Each path is first checked against its dequantized weights (its layers' outputs against a float32
product, and the whole model's logits against a model holding those weights), then its prefill and
decode are timed. :func:`linear_classes` answers the learner's
question for any loaded model: which class, and so which kernel, does the multiplying.
"""

from __future__ import annotations

import gc
from importlib import resources

import pandas as pd
import torch

from quantlesson import kernels, measure, models, speed
from quantlesson.errors import LessonError
from quantlesson.scratch import rtn

GEMLITE_VERSION = "0.6.0.post2"
WEIGHTS = ("bfloat16", "int4 tinygemm", "int4 gemlite", "int4 tinygemm, head int4", "int4 gemlite, head int4",
           "NF4 bitsandbytes", "no matmuls (floor)")
CHECKS = ["layer_error", "logit_error", "top1_agreement"]
COLUMNS = speed.SPEED_COLUMNS + ["kernel", "prefill_tokens_per_s"] + CHECKS + ["note"]


# ---------------------------------------------------------------------------------------------
# Which kernel runs
# ---------------------------------------------------------------------------------------------


def linear_classes(model: torch.nn.Module) -> dict[str, int]:
    """How many layers of each class do the model's matrix multiplies, e.g. ``{"Linear4bit": 154, "Linear": 1}``.

    Every library swaps ``nn.Linear`` for its own class when it loads a quantized model; the class names the
    kernel, or shows that the weights were decompressed back into a plain ``Linear``. A layer is a module with
    ``in_features`` and ``out_features`` and no such submodule of its own.
    """
    counts: dict[str, int] = {}
    for module in model.modules():
        is_linear = hasattr(module, "in_features") and hasattr(module, "out_features")
        if is_linear and not any(hasattr(child, "in_features") for child in module.children()):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    if not counts:
        raise LessonError("The model has no linear layers (modules with in_features and out_features).")
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


# ---------------------------------------------------------------------------------------------
# gemlite: Triton kernels for the same 4-bit codes
# ---------------------------------------------------------------------------------------------


def gemlite_available() -> bool:
    """True if gemlite's kernels can run here; otherwise print why not (no GPU, or not installed)."""
    if not torch.cuda.is_available():
        print(models.no_gpu_message("gemlite's Triton kernels"))
        return False
    try:
        import gemlite  # noqa: F401
    except ImportError as error:
        print(f"gemlite is not installed ({error}): pip install gemlite=={GEMLITE_VERSION}")
        return False
    return True


def _load_closest_gemlite_config() -> None:
    """gemlite ships tuned kernel settings per GPU name (``h100.json``, ...). An H200 (the same Hopper chip with
    more memory) matches none and would autotune at first use, so it gets the H100's."""
    import gemlite

    if "H200" in torch.cuda.get_device_name():
        gemlite.GemLiteLinear.load_config(str(resources.files("gemlite").joinpath("configs/h100.json")))


def gemlite_linear(codes: torch.Tensor, scale: torch.Tensor, group_size: int, bias: torch.Tensor | None = None) -> torch.nn.Module:
    """Codes ``[out, in]`` in -8..7 and a scale per group ``[out, in / group_size]`` as a gemlite layer.

    gemlite computes ``w = (q - zero) * scale`` with ``q`` in 0..15: the same weights with ``q + 8`` and zero 8.
    """
    from gemlite import DType, GemLiteLinear

    out_features, in_features = codes.shape
    if in_features % group_size or in_features % 32:
        raise LessonError(f"gemlite needs the input width ({in_features}) divisible by 32 and by the group size ({group_size}).")
    layer = GemLiteLinear(4, group_size=group_size, in_features=in_features, out_features=out_features,
                          input_dtype=DType.BF16, output_dtype=DType.BF16)
    unsigned = (codes.to(torch.int16) + 8).to("cuda", torch.uint8)  # [out, in], 0..15
    layer.pack(unsigned, scale.to("cuda", torch.bfloat16), zeros=8,
               bias=None if bias is None else bias.detach().to("cuda", torch.bfloat16))
    return layer


def quantize_to_gemlite(model: torch.nn.Module, group_size: int = 128, skip: tuple[str, ...] = ("lm_head",)) -> torch.nn.Module:
    """Replace every linear layer but ``skip`` with a gemlite layer of round-to-nearest 4-bit codes, in place.

    The codes equal :func:`quantlesson.kernels.quantize_to_int4pack`'s, so both paths compute with the same
    weights. ``skip=()`` quantizes the head too (the largest single matrix of a small model).
    """
    models.require_capability("gemlite's 4-bit kernels", 8, 0)
    if not gemlite_available():
        raise LessonError(f"gemlite is not installed: pip install gemlite=={GEMLITE_VERSION}")
    _load_closest_gemlite_config()
    for name, linear in rtn.linear_layers(model, skip).items():
        codes, scale, _ = rtn.quantize_weight(linear.weight.detach().float(), 4, group_size, symmetric=True)
        rtn.replace_module(model, name, gemlite_linear(codes, scale, group_size, linear.bias))
    return model


def dequantize_in_place(model: torch.nn.Module, group_size: int = 128, skip: tuple[str, ...] = ("lm_head",)) -> torch.nn.Module:
    """The reference of both int4 paths: each linear weight replaced by its dequantized 4-bit codes, in place.

    Each gets a new tensor, so a head tied to the embedding table is untied, as quantizing the head unties it.
    """
    for linear in rtn.linear_layers(model, skip).values():
        restored = rtn.fake_quantize(linear.weight.detach().float(), 4, group_size, symmetric=True)
        linear.weight = torch.nn.Parameter(restored.to(linear.weight.dtype), requires_grad=False)
    return model


# ---------------------------------------------------------------------------------------------
# bitsandbytes NF4, in place (as transformers' BitsAndBytesConfig would load it)
# ---------------------------------------------------------------------------------------------


def nf4_in_place(model: torch.nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> torch.nn.Module:
    """Every linear layer but ``skip`` as bitsandbytes' ``Linear4bit`` (NF4, double quant, bfloat16 compute), in place."""
    import bitsandbytes as bnb

    for name, linear in rtn.linear_layers(model, skip).items():
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                                  compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(linear.weight.detach(), requires_grad=False, quant_type="nf4", compress_statistics=True)
        layer.bias = linear.bias
        rtn.replace_module(model, name, layer.to("cuda"))  # moving the weight to the GPU quantizes it
    return model


def nf4_dequantized(model: torch.nn.Module, quantized: torch.nn.Module) -> torch.nn.Module:
    """``model`` (the same twin, unquantized) given each NF4 layer's dequantized weight, in place."""
    import bitsandbytes as bnb

    layers = dict(quantized.named_modules())
    for name, linear in list(model.named_modules()):
        if isinstance(layers.get(name), bnb.nn.Linear4bit):
            weight = layers[name].weight
            restored = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(torch.bfloat16)
            linear.weight = torch.nn.Parameter(restored, requires_grad=False)
    return model


class NoMatmul(torch.nn.Module):
    """Stands in for a linear layer without multiplying: each output row repeats the input row's first value.

    The output depends on the input, so ``torch.compile`` cannot fold the rest of the step away (with an
    all-zeros output it folded attention and norms into constants and the "floor" ran 50 times too fast).
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :1].expand(*x.shape[:-1], self.out_features).contiguous()


class ContiguousInput(torch.nn.Module):
    """Hands ``layer`` a contiguous input. PyTorch's int4 kernel needs one, and a head gets a strided slice (the
    last position of each sequence) once the batch is larger than 1. The lesson's other episodes never quantize
    the head, so :class:`quantlesson.kernels.Int4PackLinear` does not do this itself yet."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer, self.in_features, self.out_features = layer, layer.in_features, layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.contiguous())


# ---------------------------------------------------------------------------------------------
# Each path: built, checked against its dequantized weights, timed
# ---------------------------------------------------------------------------------------------


def build(twin: str, weights: str, group_size: int = 128) -> torch.nn.Module:
    """The shape twin in bfloat16 on the GPU, its linear layers on the kernel that ``weights`` names."""
    if weights not in WEIGHTS:
        raise LessonError(f"No kernel path called {weights!r}: choose one of {WEIGHTS}.")
    model = models.twin(twin, dtype=torch.bfloat16, device="cuda")
    skip = () if "head int4" in weights else ("lm_head",)
    if weights.startswith("int4 tinygemm"):
        kernels.quantize_to_int4pack(model, group_size, skip=skip)
        if not skip:
            model.lm_head = ContiguousInput(model.lm_head)
    elif weights.startswith("int4 gemlite"):
        quantize_to_gemlite(model, group_size, skip=skip)
    elif weights == "NF4 bitsandbytes":
        nf4_in_place(model)
    elif weights == "no matmuls (floor)":
        for name, linear in rtn.linear_layers(model, skip=()).items():
            rtn.replace_module(model, name, NoMatmul(linear.in_features, linear.out_features))
    return model


def check_inputs(vocab_size: int) -> list[torch.Tensor]:
    """Token ids in the shapes each kernel sees: 1 row (decode: a GEMV), 16 rows (batched decode), 256 (prefill)."""
    generator = torch.Generator("cuda").manual_seed(0)
    return [torch.randint(0, vocab_size, shape, device="cuda", generator=generator) for shape in ((1, 1), (16, 1), (1, 256))]


def logits_of(model: torch.nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The model's logits (float32) for each input, without a cache."""
    with torch.inference_mode():
        return [model(input_ids=ids, use_cache=False).logits.float() for ids in inputs]


def logit_check(logits: list[torch.Tensor], reference: list[torch.Tensor]) -> tuple[float, float]:
    """(largest relative error ``||a - b|| / ||b||`` over the inputs, share of positions with the same top-1 token)."""
    errors = [float((a - b).norm() / b.norm()) for a, b in zip(logits, reference)]
    same = torch.cat([(a.argmax(-1) == b.argmax(-1)).flatten() for a, b in zip(logits, reference)])
    return max(errors), float(same.float().mean())


def layer_error(model: torch.nn.Module, reference: torch.nn.Module, rows: tuple[int, ...] = (1, 16, 256)) -> float:
    """Largest relative error of the path's first, last and head layers against ``x @ W^T`` in float32, with ``W``
    the reference's (dequantized) weight, for inputs of 1, 16 and 256 rows (the kernels differ by row count)."""
    layers = [name for name, _ in rtn.linear_layers(reference, skip=()).items()]
    generator = torch.Generator("cuda").manual_seed(2)
    errors = []
    with torch.inference_mode():
        for name in (layers[0], layers[-2], layers[-1]):
            layer, weight = model.get_submodule(name), reference.get_submodule(name).weight.float()
            for n in rows:
                x = torch.randn(n, weight.shape[1], device="cuda", generator=generator).to(torch.bfloat16)
                exact = x.float() @ weight.T
                errors.append(float((layer(x).float() - exact).norm() / exact.norm()))
    return max(errors)


def checks(twin: str, weights: str, quantized: torch.nn.Module, group_size: int = 128) -> dict[str, float]:
    """The path against the twin holding its dequantized weights: :func:`layer_error`, and the whole model's
    logits on :func:`check_inputs` (:func:`logit_check`). For bfloat16 the reference holds the same weights, so
    its figures are bfloat16's own rounding: the yardstick for the others."""
    if weights == "no matmuls (floor)":
        return dict.fromkeys(CHECKS, float("nan"))
    reference = models.twin(twin, dtype=torch.bfloat16, device="cuda")  # the same seed: the same weights
    if weights == "NF4 bitsandbytes":
        nf4_dequantized(reference, quantized)
    elif weights != "bfloat16":
        dequantize_in_place(reference, group_size, skip=() if "head int4" in weights else ("lm_head",))
    result = {"layer_error": layer_error(quantized, reference)}
    if weights == "bfloat16":  # the same model: compare its logits with float32 ones instead
        reference.float()
    inputs = check_inputs(reference.config.vocab_size)
    result["logit_error"], result["top1_agreement"] = logit_check(logits_of(quantized, inputs), logits_of(reference, inputs))
    del reference
    _free()
    return result


def prefill_speed(model: torch.nn.Module, tokens: int = 2048, repeats: int = 3) -> float:
    """Tokens per second of one forward pass over a ``tokens``-long prompt (batch 1, eager, median of ``repeats``)."""
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)  # warm-up: kernel choice, autotuning
        seconds = sorted(measure._timed(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), ids.device)
                         for _ in range(repeats))
    return tokens / seconds[len(seconds) // 2]


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def _decode_rows(model, twin: str, weights: str, bandwidth: float, batches, compile_batches, new_tokens: int, extra: dict) -> list[dict]:
    """Decode timed with plain ``generate`` (batch 1), a captured step (every batch) and a compiled one (``compile_batches``)."""
    rows = []
    for batch in batches:
        ids = torch.randint(0, model.config.vocab_size, (batch, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(batch))
        ways = ([("generate", {})] if batch == 1 else []) + [("graph", {"graph": True})]
        ways += [("compile", {"graph": True, "compile": True})] if batch in compile_batches else []
        for way, options in ways:
            torch._dynamo.reset()  # a fresh compile for each path and batch (dynamo gives up after 8 recompiles)
            try:
                timing = (measure.generate_speed(model, ids, new_tokens=32, bandwidth=bandwidth) if way == "generate"
                          else measure.static_decode_speed(model, ids, new_tokens, bandwidth=bandwidth, **options))
                rows.append({**speed._row(twin, weights, timing), **extra})
            except Exception as error:  # e.g. a kernel that cannot be captured in a CUDA graph
                note = f"{way} failed: {type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]}"
                print(f"  {weights}, batch {batch}: {note}")
                rows.append({"model": twin, "weights": weights, "path": way, "batch": batch, "gpu": torch.cuda.get_device_name(),
                             **extra, "note": note})
    return rows


def benchmark(
    twin: str, bandwidth: float, weights: tuple[str, ...] = WEIGHTS, batches: tuple[int, ...] = (1, 4, 16, 64),
    compile_batches: tuple[int, ...] = (1, 16), new_tokens: int = 64, group_size: int = 128,
) -> pd.DataFrame | None:  # fmt: skip
    """Each kernel path of one shape twin, checked against its dequantized weights, then prefill and decode timed.

    Decode runs with a static cache and a captured CUDA graph at every batch size, also compiled at
    ``compile_batches``, and with plain ``generate`` at batch 1. A path that cannot run here is skipped with
    a message; a way of decoding that fails gets a row with the reason in ``note``.
    """
    if not speed.gpu_available() or not models.can_run("The kernel comparison (bfloat16 and the 4-bit kernels)", 8, 0):
        return None
    rows = []
    for name in weights:
        if "gemlite" in name and not gemlite_available():
            continue
        model = build(twin, name, group_size)
        checked = checks(twin, name, model, group_size)
        kernel = ", ".join(linear_classes(model))
        prefill = prefill_speed(model)
        print(f"{twin}, {name} ({kernel}): against its dequantized weights: layers {checked['layer_error']:.1e}, "
              f"logits {checked['logit_error']:.1e} (relative errors), top-1 agreement {checked['top1_agreement']:.1%}; "
              f"prefill of 2,048 tokens: {prefill:,.0f} tokens/s")
        extra = {"kernel": kernel, "prefill_tokens_per_s": prefill, **checked, "note": ""}
        new = _decode_rows(model, twin, name, bandwidth, batches, compile_batches, new_tokens, extra)
        print("  decode, tokens/s per sequence: " + "  ".join(
            f"{r['path'].replace('static cache + ', '')} b{r['batch']}: {r['tokens_per_s']:.0f}" for r in new if "tokens_per_s" in r))
        rows += new
        del model
        _free()
    return pd.DataFrame(rows, columns=COLUMNS)


# ---------------------------------------------------------------------------------------------
# Reading the measurements
# ---------------------------------------------------------------------------------------------


def best_decode(runs: pd.DataFrame) -> pd.DataFrame:
    """The fastest way of decoding (plain, captured or compiled) of each twin, path and batch size: one row each."""
    timed = runs.dropna(subset=["tokens_per_s"])
    best = timed.loc[timed.groupby(["model", "weights", "batch"])["tokens_per_s"].idxmax()]
    return best.reset_index(drop=True)


def summary(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per twin and path: its checks, prefill speed, best decode speed at each batch size (tokens/s per
    sequence), the share of the bandwidth bound at batch 1, and the speed-up over bfloat16 at batch 1."""
    best = best_decode(runs)
    decode = best.pivot_table(index=["model", "weights"], columns="batch", values="tokens_per_s")
    decode.columns = [f"decode b{b}" for b in decode.columns]
    first = runs.groupby(["model", "weights"], sort=False)[["kernel", "layer_error", "top1_agreement", "prefill_tokens_per_s"]].first()
    table = first.join(decode)
    batch1 = best[best["batch"] == 1].set_index(["model", "weights"])
    table["bound share b1"] = batch1["roofline_fraction"].where(batch1.index.get_level_values("weights") != "no matmuls (floor)")
    baseline = table["decode b1"].xs("bfloat16", level="weights")
    table["x bfloat16 b1"] = table["decode b1"] / baseline.reindex(table.index.get_level_values("model")).to_numpy()
    order = {name: i for i, name in enumerate(WEIGHTS)}
    return table.sort_index(key=lambda index: index.map(order) if index.name == "weights" else index)


def floor_ms(runs: pd.DataFrame, twin: str, batch: int = 1) -> float:
    """The step time (ms) of the twin's ``no matmuls (floor)`` path at ``batch``, the best way it was decoded."""
    floor = best_decode(runs)
    rows = floor[(floor["model"] == twin) & (floor["weights"] == "no matmuls (floor)") & (floor["batch"] == batch)]
    if rows.empty:
        raise LessonError(f"No floor measurement for {twin} at batch {batch}: run benchmark() with 'no matmuls (floor)'.")
    return float(rows["ms_per_step"].iloc[0])
