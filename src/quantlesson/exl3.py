"""ExLlamaV3 from the lesson: convert a model to EXL3, run it, and measure it like every other variant.

Where ExLlamaV3 1.6.5 runs, read from its source: NVIDIA GPUs of compute capability 7.5 (Turing) or newer,
Turing through slower fallbacks (``exllamav3_ext/arch.cuh``), not Volta; on AMD only RDNA GPUs, which run
32-wide wavefronts; data-centre CDNA parts (LUMI's MI250X, MI300) run 64-wide and are refused
(``util/arch_list.py``). The lesson has run it on an H200 only, so :func:`available` runs it from compute
capability 8.0 (Ampere) up and asks for ``untested=True`` on Turing and RDNA. The PyPI wheel carries no
compiled kernels: its extension compiles at the first import (about four minutes on the lesson's H200
machine, longer on a small one). :func:`available` says whether it can run here, with a message that says
what to do when not. The trellis idea under EXL3 is taught from scratch in
:mod:`quantlesson.scratch.trellis`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

from quantlesson.errors import LessonError
from quantlesson.exl2 import decode_rate
from quantlesson.models import no_gpu_message

VERSION = "1.6.5"


OTHER_FORMATS = "use GGUF (llama.cpp), bitsandbytes or GPTQ instead (see 'Which method when')"


def gpu_support() -> tuple[bool, str]:
    """Whether ExLlamaV3 runs on this GPU: ``(False, why not)``, ``(True, note)`` where it runs but this lesson has
    not run it (Turing, AMD RDNA), or ``(True, "")`` from compute capability 8.0 up.

    Assumes a GPU is visible. ROCm builds of torch report an AMD GPU through ``torch.cuda``.
    """
    name = torch.cuda.get_device_name()
    if torch.version.hip:  # AMD: ExLlamaV3 builds for 32-wide wavefronts (RDNA) only
        properties = torch.cuda.get_device_properties(0)
        arch, warp = properties.gcnArchName.split(":")[0], getattr(properties, "warp_size", 32)
        if warp != 32:
            return False, (f"ExLlamaV3 {VERSION} runs on AMD GPUs of 32-wide wavefronts (RDNA) only; {name} ({arch}) "
                           f"runs {warp}-wide, as LUMI's MI250X does. On this GPU {OTHER_FORMATS}.")  # fmt: skip
        return True, f"ExLlamaV3 {VERSION} builds for AMD RDNA GPUs such as {name} ({arch}); this lesson has not run it there."
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (7, 5):
        return False, (f"ExLlamaV3 {VERSION} needs compute capability 7.5 (Turing) or newer; {name} has {major}.{minor}. "
                       f"On this GPU {OTHER_FORMATS}.")  # fmt: skip
    if major < 8:
        return True, (f"ExLlamaV3 {VERSION} runs Turing GPUs such as {name} ({major}.{minor}) through slower fallback "
                      "kernels, which this lesson has not run (its EXL3 rows come from an H200).")  # fmt: skip
    return True, ""


def available(untested: bool = False) -> bool:
    """True if ExLlamaV3 can run here; otherwise print why not (no GPU, too old a GPU, not installed) and return False.

    ``untested=True`` also runs it where ExLlamaV3 supports the GPU but this lesson has not run it (Turing,
    such as Colab's T4, and AMD RDNA); without it those GPUs get a message that says how to try.
    """
    if not torch.cuda.is_available():
        print(no_gpu_message("ExLlamaV3"))
        return False
    supported, note = gpu_support()
    if not supported:
        print(note)
        return False
    if note and not untested:
        print(f"{note} To try it, call exl3.available(untested=True); its kernels then compile at the first import "
              "(about four minutes on the lesson's 16-core H200 machine, longer with fewer cores).")  # fmt: skip
        return False
    if note:
        print(note)
    try:
        import exllamav3  # noqa: F401  (compiles its CUDA extension the first time)
    except ImportError as error:
        print(f"ExLlamaV3 is not installed ({error}): pip install exllamav3=={VERSION} (see the episode's setup notes).")
        return False
    return True


def check_bits(bits: float, head_bits: int) -> None:
    """ExLlamaV3's converter takes 1-8 bits per weight for the layers, and 1-8 or 16 (unquantized) for the head."""
    if not 1.0 <= bits <= 8.0:
        raise LessonError(f"bits={bits}: EXL3 targets lie between 1 and 8 bits per weight.")
    if head_bits != 16 and not 1 <= head_bits <= 8:
        raise LessonError(f"head_bits={head_bits}: the head takes 1 to 8 bits, or 16 to stay unquantized.")


def write_calibration(calibration: torch.Tensor, path: str | Path) -> Path:
    """ExLlamaV3 reads calibration tokens from a safetensors file: ``input_ids``, ``[rows, columns]``."""
    from safetensors.torch import save_file

    if calibration.dim() != 2:
        raise LessonError(f"calibration has shape {tuple(calibration.shape)}: pass token windows, [rows, columns].")
    path = Path(path)
    save_file({"input_ids": calibration.to(torch.int64).contiguous()}, str(path))
    return path


def pad_hidden_size(model, multiple: int = 128) -> int:
    """Widen a Llama model's hidden size to a multiple of ``multiple`` without changing what it computes.

    The lesson's one workaround for ExLlamaV3, kept beside the code it serves. ExLlamaV3 1.6.5 pads every
    linear layer to multiples of 128, but its ``GatedMLP`` (the Llama MLP) does not trim the down projection's
    padded output, unlike its ``Attention`` (``trim_padded_out`` on ``o_proj``) and its plain ``MLP``
    (``exllamav3/modules/mlp.py``). A model whose hidden size is not a multiple of 128 (SmolLM2-135M: 576)
    then fails in ExLlamaV3: seen on the H200 by ``tools/gpu_exl3_probe.py``, its result committed in
    ``results/gpu-exl3-probe.json`` and checked against the pinned version by ``tests/test_exl3.py``. No
    upstream issue was found.

    Widening first avoids that path. The new residual dimensions are zero in the embedding and in every weight
    that writes to them, so they stay zero. Each RMSNorm weight is scaled by ``sqrt(old / new)`` and
    ``rms_norm_eps`` by ``old / new``: the mean square over the wider vector is ``old / new`` times the
    original, so each norm gives the same output. ``head_dim`` is written explicitly, since transformers would
    otherwise derive it from the new hidden size. The widened model is for ExLlamaV3 only: transformers refuses
    to load a saved one whose hidden size is no multiple of its head count (640 and 9 heads).

    Returns the new hidden size (the same size, with nothing changed, when it is already a multiple).
    """
    config = model.config
    if config.model_type != "llama":
        raise LessonError(f"pad_hidden_size handles Llama models; this one is {config.model_type!r}.")
    old = config.hidden_size
    new = -(-old // multiple) * multiple
    if new == old:
        return old
    extra = new - old

    def columns(weight: torch.nn.Parameter) -> torch.nn.Parameter:  # [out, old] -> [out, new]: reads zeros
        return torch.nn.Parameter(torch.nn.functional.pad(weight.data, (0, extra)), requires_grad=False)

    def rows(weight: torch.nn.Parameter) -> torch.nn.Parameter:  # [old, in] -> [new, in]: writes zeros
        return torch.nn.Parameter(torch.nn.functional.pad(weight.data, (0, 0, 0, extra)), requires_grad=False)

    def norm(module) -> None:  # [old] -> [new], scaled so that the mean square over new dims gives the same output
        scaled = module.weight.data * (old / new) ** 0.5
        module.weight = torch.nn.Parameter(torch.nn.functional.pad(scaled, (0, extra)), requires_grad=False)
        module.variance_epsilon = config.rms_norm_eps * old / new

    body = model.model
    body.embed_tokens.weight = columns(body.embed_tokens.weight)  # [vocab, new]
    for layer in body.layers:
        attention, mlp = layer.self_attn, layer.mlp
        for linear in (attention.q_proj, attention.k_proj, attention.v_proj, mlp.gate_proj, mlp.up_proj):
            linear.weight, linear.in_features = columns(linear.weight), new
        for linear in (attention.o_proj, mlp.down_proj):
            linear.weight, linear.out_features = rows(linear.weight), new
            if linear.bias is not None:
                linear.bias = torch.nn.Parameter(torch.nn.functional.pad(linear.bias.data, (0, extra)), requires_grad=False)
        norm(layer.input_layernorm)
        norm(layer.post_attention_layernorm)
    norm(body.norm)
    if config.tie_word_embeddings:
        model.lm_head.weight = body.embed_tokens.weight
    else:
        model.lm_head.weight = columns(model.lm_head.weight)
    model.lm_head.in_features = new
    config.head_dim = getattr(config, "head_dim", None) or old // config.num_attention_heads
    config.hidden_size = new
    config.rms_norm_eps = config.rms_norm_eps * old / new
    return new


def unfuse_narrow_kv(model) -> int:
    """Run k_proj and v_proj one after the other where ExLlamaV3's fused pair has no kernel; return how many were unfused.

    The lesson's second workaround for ExLlamaV3 1.6.5, kept beside the first (:func:`pad_hidden_size`). At
    batch 1 its ``Attention`` runs k_proj and v_proj as one multi-GEMM (``multi_kv``) into an output buffer of
    ``num_kv_heads * head_dim`` columns, the unpadded width (``prealloc_kv_1`` in ``exllamav3/modules/attn.py``),
    and its kernels need a multiple of 128 there (``exl3_gemm_shape_compat``: the output width a multiple of the
    tile's 128 or more). SmolLM2-135M has 3 key/value heads of 64: 192 columns, and its decode on the H200
    stopped with "exl3_mgemm autotune: no compatible kernel shapes" (07c's SmolLM2 rows, 2026-12-04). The
    cause was found by reading ExLlamaV3's source; ``tools/gpu_exl3_probe.py`` decodes its widened twin with and
    without this function, and ``tests/test_exl3.py`` checks its committed result. Without ``multi_kv`` the
    module calls the two projections separately, as it does for inputs longer than 32 tokens; nothing else
    changes. ``model`` is a loaded ``exllamav3.Model``. No upstream issue was found.
    """
    unfused, stack = 0, list(model.modules)
    while stack:
        module = stack.pop()
        stack.extend(getattr(module, "modules", []))
        fused = getattr(module, "multi_kv", None)
        if fused is not None and (module.num_kv_heads * module.head_dim) % 128:
            fused.unload()
            module.multi_kv = None
            unfused += 1
    return unfused


def save(model, tokenizer, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Save a transformers model (and its tokenizer) where ExLlamaV3 can convert or run it; returns ``folder``.

    A copy is saved, in ``dtype`` if given: the model passed in is left as it was. When its hidden size is not a
    multiple of 128 (SmolLM2-135M: 576) the copy is first widened, computing the same function, by
    :func:`pad_hidden_size`: ExLlamaV3 1.6.5 fails on such a model otherwise.
    """
    import copy

    folder = Path(folder)
    saved = copy.deepcopy(model).to("cpu")
    if dtype is not None:
        saved = saved.to(dtype)
    old = saved.config.hidden_size
    new = pad_hidden_size(saved)
    if new != old:
        print(f"hidden size {old} is not a multiple of 128: saved widened to {new}, the same function "
              "(quantlesson.exl3.pad_hidden_size)")  # fmt: skip
        saved.config.hidden_size = old  # transformers refuses to save 640 with 9 heads: config.json gets it below
    saved.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if new != old:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "hidden_size": new}, indent=2) + "\n")
    return folder


def check_folder(model_folder: Path) -> None:
    """A folder ExLlamaV3 can take: saved by save_pretrained, with a hidden size that is a multiple of 128."""
    if not (model_folder / "config.json").exists():
        raise LessonError(f"{model_folder} holds no config.json: pass a folder written by exl3.save (or save_pretrained).")
    hidden = json.loads((model_folder / "config.json").read_text()).get("hidden_size", 0)
    if hidden % 128:
        raise LessonError(f"{model_folder} has hidden size {hidden}, not a multiple of 128, which ExLlamaV3 {VERSION} "
                          "cannot run: save the model with exl3.save(model, tokenizer, folder), which widens it.")  # fmt: skip


def convert(model_folder: str | Path, work: str | Path, bits: float, calibration: torch.Tensor | None = None,
            head_bits: int = 6, rows: int = 16, columns: int = 512) -> Path:  # fmt: skip
    """Quantize a transformers model folder to EXL3 at ``bits`` per weight; returns the EXL3 folder.

    ``calibration`` (token windows, ``[rows, columns]``) replaces ExLlamaV3's own bundled text mix, of which
    it otherwise takes ``rows`` x ``columns`` tokens (its default is 250 x 2048). Each target is a whole
    run: EXL3 has no measurement pass to share between targets.
    """
    check_bits(bits, head_bits)
    model_folder, work = Path(model_folder), Path(work)
    check_folder(model_folder)
    out = work / f"exl3-{bits:.2f}bpw"
    extra = []
    if calibration is not None:
        work.mkdir(parents=True, exist_ok=True)
        rows, columns = calibration.shape
        extra = ["-cd", str(write_calibration(calibration, work / "calibration.safetensors"))]
    command = [sys.executable, "-m", "exllamav3.conversion.convert_model", "-i", str(model_folder), "-o", str(out),
               "-w", str(work / f"job-{bits:.2f}"), "-b", str(bits), "-hb", str(head_bits), "-cr", str(rows),
               "-cc", str(columns), "-cpi", "100000", *extra]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    # the converter prints " !! Error: ..." and still exits 0 when its arguments are refused
    if result.returncode != 0 or not (out / "config.json").exists() or "!! Error" in result.stdout:
        raise LessonError(f"convert_model failed (exit {result.returncode}):\n{(result.stdout + result.stderr)[-3000:]}")
    return out


def stored_bits(folder: str | Path) -> float:
    """The layers' bits per weight that ExLlamaV3 wrote into the folder's config.json (the head excluded)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    if config.get("quantization_config", {}).get("quant_method") != "exl3":
        raise LessonError(f"{folder} is not an EXL3 model (its config.json has no exl3 quantization_config).")
    return float(config["quantization_config"]["bits"])


class ExLlamaV3Model(torch.nn.Module):
    """An EXL3 (or unquantized) model run by ExLlamaV3, callable like a transformers model for :mod:`quantlesson.evaluate`."""

    def __init__(self, folder: str | Path, max_tokens: int = 2048):
        super().__init__()
        from exllamav3 import Cache, Config, Model, Tokenizer

        check_folder(Path(folder))
        self.config = Config.from_directory(str(folder))
        self.model = Model.from_config(self.config)
        self.cache = Cache(self.model, max_num_tokens=-(-max_tokens // 256) * 256)  # pages of 256 tokens, before load
        self.model.load(device="cuda:0")
        unfuse_narrow_kv(self.model)
        self.tokenizer = Tokenizer.from_config(self.config)
        self.vocab_size = self.config.vocab_size
        self._device = torch.nn.Parameter(torch.empty(0, device="cuda"), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, **_) -> types.SimpleNamespace:
        logits = self.model.forward(input_ids, {"attn_mode": "flash_attn_nc"})  # no cache: the whole window at once
        return types.SimpleNamespace(logits=logits[..., : self.vocab_size].float())  # [batch, seq, vocab]; the head may be padded

    def decode_speed(self, prompt: torch.Tensor, new_tokens: int = 128) -> float | None:
        """Greedy decode tokens per second with ExLlamaV3's generator at batch 1, prefill excluded.

        None, with ExLlamaV3's message printed, where it has no kernel for the model's shapes at batch 1 (so it
        was for SmolLM2-135M before :func:`unfuse_narrow_kv`); its forward pass, the quality figures, needs none.
        """
        from exllamav3 import ArgmaxSampler, Generator, Job

        generator = Generator(model=self.model, cache=self.cache, tokenizer=self.tokenizer, max_batch_size=1)

        def run(n: int) -> float:
            generator.enqueue(Job(input_ids=prompt[None].cpu(), max_new_tokens=n, min_new_tokens=n,
                                  sampler=ArgmaxSampler(), stop_conditions=None))  # fmt: skip
            torch.cuda.synchronize()
            start = time.perf_counter()
            while generator.num_remaining_jobs():
                generator.iterate()
            torch.cuda.synchronize()
            return time.perf_counter() - start

        try:
            run(new_tokens)  # warm-up: the same work once, untimed (the generator captures its graphs here)
            return decode_rate(run, new_tokens)
        except RuntimeError as error:
            if "no compatible kernel shapes" not in str(error):
                raise
            print(f"no decode speed: ExLlamaV3 {VERSION} has no batch-1 kernel for this model's shapes ({error}); "
                  "its forward pass, which gives the quality figures, does not need one")  # fmt: skip
            return None


def repeat_layers(folder: str | Path, num_layers: int) -> None:
    """Lengthen an EXL3 (or EXL2) model, converted with fewer layers, to ``num_layers`` by repeating its layers' tensors.

    Only for speed on a shape twin, whose weights are random anyway: decoding then reads the same bytes through
    the same kernels as a model converted whole, while the conversion covers only the layers converted.
    """
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    converted = config["num_hidden_layers"]
    if not 0 < converted <= num_layers:
        raise LessonError(f"{folder} has {converted} layers: it can be repeated to {converted} or more, not {num_layers}.")
    files = sorted(folder.glob("*.safetensors"))
    tensors = {key: value for file in files for key, value in load_file(file).items()}
    repeated = {}
    for key, tensor in tensors.items():
        layer = re.match(r"model\.layers\.(\d+)\.(.+)", key)
        if layer is None:
            repeated[key] = tensor
            continue
        for index in range(int(layer[1]), num_layers, converted):  # layer i becomes i, i + converted, ...
            repeated[f"model.layers.{index}.{layer[2]}"] = tensor.clone()  # safetensors stores no shared tensors
    for file in files:
        file.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(repeated, str(folder / "model.safetensors"))
    config["num_hidden_layers"] = num_layers
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def twin_speed(name: str, tokenizer, work: str | Path, bits: float = 4.0, layers: int | None = None) -> dict:
    """Convert a shape twin (random weights, a real model's shapes) to EXL3 and time its decode at batch 1.

    ``tokenizer`` is any tokenizer the converter can read (the twin's text is noise: only the speed counts).
    ``layers`` converts only that many layers and repeats them to the real depth (:func:`repeat_layers`): the
    Llama-3.1-8B twin then converts in a fraction of the time, and its ``quant_seconds`` cover those layers.
    Returns the folder's size, the conversion's seconds and the decode tokens/s, with the bandwidth bound
    for the bytes the GPU reads per token (ExLlamaV3, like ExLlamaV2, looks embeddings up in CPU memory).
    """
    from transformers import AutoModelForCausalLM

    from quantlesson import exl2, measure, models

    work = Path(work)
    config = models.twin_config(name)
    depth = config.num_hidden_layers
    if layers is not None:
        if not 0 < layers <= depth:
            raise LessonError(f"layers={layers}: the {name} twin has {depth}; convert between 1 and {depth} of them.")
        config.num_hidden_layers = layers
    torch.manual_seed(0)
    twin = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()  # random weights, on the CPU
    save(twin, tokenizer, work / "hf")
    del twin
    start = time.perf_counter()
    folder = convert(work / "hf", work, bits, head_bits=6, rows=8, columns=256)
    seconds = time.perf_counter() - start
    if layers is not None and layers < depth:
        repeat_layers(folder, depth)
    size = measure.size_on_disk(folder)
    runner = ExLlamaV3Model(folder)
    tokens_per_s = runner.decode_speed(torch.arange(64), new_tokens=256)
    gpu_bytes = exl2.gpu_bytes_per_token(size, models.twin_config(name))
    bound = measure.copy_bandwidth("cuda") / gpu_bytes
    del runner
    return {"size_bytes": size, "quant_seconds": seconds, "decode_tok_s": tokens_per_s, "gpu_bytes": gpu_bytes,
            "bound_tok_s": bound, "converted_layers": layers or depth, "layers": depth}  # fmt: skip


def twin_row(name: str, twin: dict, bits: float = 4.0) -> dict:
    """The GPU table's row for a :func:`twin_speed` result: ``report.record(path, **twin_row(name, twin))``."""
    repeated = twin.get("converted_layers", twin.get("layers")) != twin.get("layers")
    method = f"EXL3 {bits:.1f} bpw, ExLlamaV3 generator, batch 1"
    if repeated:
        method += f" ({twin['converted_layers']} converted layers repeated to {twin['layers']})"
    return {"episode": "07c-exl3", "model": f"{name} (shape twin)", "bits": round(bits), "bits_per_weight": bits,
            "method": method, "size_mb": round(twin["size_bytes"] / 1e6, 1), "decode_tok_s": round(twin["decode_tok_s"], 1),
            "quant_seconds": None if repeated else round(twin["quant_seconds"], 1)}  # fmt: skip
