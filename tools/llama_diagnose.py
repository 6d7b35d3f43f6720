"""Load a GGUF through llama-cpp-python one way, for tools/gpu_run.sh's diagnose_llama (episode 06 crashed on the H200).

    python tools/llama_diagnose.py MODEL.gguf VARIANT

VARIANT: ``raw`` (llama_model_load_from_file with the default parameters, no Llama class), ``vocab`` (vocabulary
only), ``nommap`` (no memory map), ``cuda-first`` (CUDA initialised by torch first), ``plain`` (what episode 06 does).
"""

import sys

path, variant = sys.argv[1], sys.argv[2]
if variant == "cuda-first":
    import torch

    torch.zeros(1, device="cuda")
import llama_cpp

print("llama_cpp from", llama_cpp.__file__, "| system info:", llama_cpp.llama_print_system_info().decode(), flush=True)
if variant == "raw":
    params = llama_cpp.llama_model_default_params()
    print("default params:", {name: getattr(params, name) for name, _ in params._fields_ if "callback" not in name}, flush=True)
    model = llama_cpp.llama_model_load_from_file(path.encode(), params)
    print("loaded:", bool(model), flush=True)
    if not model:
        sys.exit(f"llama.cpp could not load {path}")
else:
    options = {"vocab": {"vocab_only": True}, "nommap": {"use_mmap": False}}.get(variant, {})
    llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_batch=512, n_threads=1, logits_all=True, verbose=True, **options)
    if variant != "vocab":
        llm.eval(list(range(1, 300)))
        print("llama.cpp ran:", llm.scores[:299].shape, flush=True)
print(variant, "passed", flush=True)
