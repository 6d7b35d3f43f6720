"""Load a GGUF through llama-cpp-python and run it, as episode 06 does: tools/gpu_run.sh's ``llama_env`` runs this
under several environments and keeps the first that works (06 crashed on the H200 while loading any GGUF).

    python tools/llama_diagnose.py MODEL.gguf

Exits non-zero when the model does not load or run (a crash shows as a signal).
"""

import sys

import llama_cpp

path = sys.argv[1]
print("llama_cpp from", llama_cpp.__file__, "| system info:", llama_cpp.llama_print_system_info().decode(), flush=True)
llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_batch=512, n_threads=1, logits_all=True, verbose=True)
llm.eval(list(range(1, 300)))
print("llama.cpp ran:", llm.scores[:299].shape, flush=True)
