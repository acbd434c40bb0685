#!/usr/bin/env bash
# The CPU rehearsal of the GPU acceptance run (bash bench/gpu_check.sh --cpu) in .venv-gpu/, a venv that holds what
# the GPU machine's image holds where it matters: transformers 5.17.0, accelerate 1.15.0, tokenizers 0.23.2,
# huggingface_hub 1.33.0, safetensors 0.8.0, and no TRL, datasets, Liger, CCE, DeepSpeed, vLLM, math-verify,
# reasoning-gym or gguf (those the run needs come from .whl/). Its torch is this machine's CPU build (2.13.0, the
# image has 2.11.0 with CUDA) and its Python this machine's python3.11 (the image's is 3.12): the wheels folder
# carries multiprocess for both.
#   bash bench/gpu_rehearsal.sh OUT_DIR     # builds .venv-gpu/ (about a minute) and .whl/ when missing, then runs
# PYTHON: the interpreter of .venv-gpu (python3.11); PROJECT_PYTHON: the project's venv, for the wheels' versions.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash bench/gpu_rehearsal.sh OUT_DIR}
PYTHON=${PYTHON:-python3.11}
IMAGE_PACKAGES=(transformers==5.17.0 accelerate==1.15.0 tokenizers==0.23.2 huggingface_hub==1.33.0 safetensors==0.8.0
  peft scipy matplotlib tensorboard pytest hypothesis pyyaml pandas pyarrow xxhash fsspec aiohttp requests tqdm rich
  jinja2 psutil)
if [ ! -f .venv-gpu/ready ]; then
  rm -rf .venv-gpu
  "$PYTHON" -m venv .venv-gpu
  .venv-gpu/bin/python -m pip install -q --upgrade pip
  .venv-gpu/bin/python -m pip install -q torch==2.13.0
  .venv-gpu/bin/python -m pip install -q "${IMAGE_PACKAGES[@]}"
  printf '%s\n' "${IMAGE_PACKAGES[@]}" > .venv-gpu/ready
fi
# the wheels are taken at the versions of the project's own venv (the ones its tests ran with)
[ -f .whl/requirements.txt ] || "${PROJECT_PYTHON:-.venv/bin/python}" bench/gpu_wheels.py
PYTHON=.venv-gpu/bin/python bash bench/gpu_check.sh --cpu "$OUT"
