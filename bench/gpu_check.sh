#!/usr/bin/env bash
# The GPU acceptance check, sized for about 10 minutes on one GPU. It has four steps:
#   1. the CUDA tests (tests/test_cuda.py): fused == naive in fp32 and bf16, under autocast, inside a model, and a
#      short bf16 `target-sft train`;
#   2. bench/bench_fused.py at the Qwen-like (H=1536, V=151936) and Llama-3-8B-like (H=4096, V=128256) shapes,
#      against F.cross_entropy, torch's linear_cross_entropy, TRL, Liger and Cut Cross-Entropy (CUDA memory from
#      torch.cuda.max_memory_allocated, times from CUDA-synchronised medians); rows go to bench/results/fused.csv,
#      tables and plots to docs/benchmarks.md;
#   3. 20 steps of `target-sft train` in bf16 on a random-weight Qwen2.5-1.5B-shaped student with an online
#      teacher of the same shape; its summary (steps/s, tokens/s, peak memory) goes to bench/results/gpu_check.csv;
#   4. vLLM on the GPU (install the CUDA build first: VLLM_EXTRA=vllm TORCH_SPEC=torch bash setup.sh): the vLLM
#      tests (tests/test_vllm.py: greedy answers equal to the compact loop's, reproducible sampling, multiple choice,
#      noise-fit and the teacher cache equal to transformers'), bench/bench_generate.py with its vllm mode
#      (printed, not written to the CPU benchmark's CSV) and bench/gpu_vllm_check.py: the paper cell's sampling load
#      (128 prompts × 16 samples, up to 1,024 new tokens) on a random-weight Qwen2.5-1.5B shape, with tokens/s against
#      the compact loop, to bench/results/gpu_vllm.csv. Skipped, saying so, where vLLM is not installed.
#
#   bash bench/gpu_check.sh              # on a GPU machine, from the repository root
#   bash bench/gpu_check.sh --dry-run    # anywhere: list the steps and check what each needs; runs nothing heavy
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=bench/results
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1

step() { echo "== step $1: $2"; }

check_imports() {
  "$PY" - <<'EOF'
import importlib.util
import torch
need = {"transformers": "steps 1-3", "trl": "step 2 (TRL baseline)", "liger_kernel": "step 2 (Liger baseline)",
        "cut_cross_entropy": "step 2 (CCE baseline)", "vllm": "step 4"}
for name, use in need.items():
    print(f"  {name:18s} {'found' if importlib.util.find_spec(name) else 'MISSING'}   ({use})")
print(f"  cuda               {'available: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NOT AVAILABLE'}")
EOF
}

step 0 "what this machine has"
check_imports
if [ "$DRY" = 1 ]; then
  step 1 "$PY -m pytest tests/test_cuda.py"
  step 2 "BENCH_CUDA=1 $PY bench/bench_fused.py --device cuda --shapes qwen llama3_8b --impls naive torch_lce trl liger cce fused_sft fused_dft fused_target_sft_top64"
  step 3 "$PY bench/gpu_train_check.py --steps 20   (random-weight Qwen2.5-1.5B shape, online teacher, bf16)"
  "$PY" bench/gpu_train_check.py --dry-run
  step 4 "$PY -m pytest tests/test_vllm.py -m vllm; $PY bench/bench_generate.py --n 64 --threads 0 --no-doc; $PY bench/gpu_vllm_check.py"
  "$PY" bench/gpu_vllm_check.py --dry-run
  exit 0
fi
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run with --dry-run')"
step 1 "CUDA tests"
"$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider
step 2 "fused loss against its peers"
BENCH_CUDA=1 "$PY" bench/bench_fused.py --device cuda --shapes qwen llama3_8b \
  --impls naive torch_lce trl liger cce fused_sft fused_dft fused_target_sft_top64
step 3 "20 bf16 steps, Qwen2.5-1.5B shape, online teacher"
"$PY" bench/gpu_train_check.py --steps 20
step 4 "vLLM on the GPU"
if "$PY" -c "import vllm" 2>/dev/null; then
  "$PY" -m pytest tests/test_vllm.py -m vllm -q -p no:cacheprovider
  "$PY" bench/bench_generate.py --n 64 --threads 0 --no-doc
  "$PY" bench/gpu_vllm_check.py
else
  echo "  skipped: vLLM does not import here (VLLM_EXTRA=vllm TORCH_SPEC=torch bash setup.sh installs the CUDA build)"
fi
echo "done: $OUT/fused.csv, $OUT/gpu_check.csv, docs/benchmarks.md"
