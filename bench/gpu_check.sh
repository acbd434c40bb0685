#!/usr/bin/env bash
# The GPU acceptance run: one command on the GPU machine's own python3 (PYTHONPATH=src, nothing installed but the
# wheels carried in .whl/, made here by `python bench/gpu_wheels.py`), writing CSVs and summary.md to OUT_DIR.
#   0. what the machine has (bench/gpu_env.py), after installing .whl/ with pip --no-index --target;
#   1. the CUDA tests (tests/scale/test_cuda.py): fused == naive in fp32 and bf16, under autocast, inside a model, a
#      short bf16 `target-sft train`;
#   2. the fused loss (sft, dft, target_sft top-64) against F.cross_entropy, torch's linear_cross_entropy, TRL's
#      chunked log-prob kernel, Liger and Cut Cross-Entropy at the Qwen2.5-1.5B and Llama-3-8B shapes, bf16, N=8192
#      (bench/bench_fused.py: time and peak memory);
#   3. training a random-weight Qwen2.5-1.5B-shaped student in bf16: fused SFT, Target-SFT with an online teacher of
#      the 7B's padded vocabulary and from its top-64 cache, against TRL's SFTTrainer (loss_type="nll") on the same
#      rows (bench/gpu_train_check.py: tokens/s and peak memory);
#   4. OUT_DIR/summary.md: every figure as a ratio of two rows of this run (bench/gpu_summary.py).
# --cpu is its rehearsal: the same steps on tiny shapes on the CPU (CI runs it in a venv with the image's
# transformers; tests/test_gpu_check.py). --dry-run lists the steps and what is missing, and runs nothing heavy.
# vLLM on the GPU is not part of it (its CUDA wheel is far over what a run may carry): see docs/benchmarks.md.
#
#   bash bench/gpu_check.sh OUT_DIR                  # on the GPU machine, from the repository root
#   bash bench/gpu_check.sh --cpu OUT_DIR            # the rehearsal, anywhere
#   bash bench/gpu_check.sh --dry-run OUT_DIR
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODE=gpu DRY=0 OUT=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --cpu) MODE=cpu ;;
    -*) echo "unknown option $arg" >&2; exit 2 ;;
    *) OUT=$arg ;;
  esac
done
[ -n "$OUT" ] || { echo "usage: bash bench/gpu_check.sh [--dry-run] [--cpu] OUT_DIR" >&2; exit 2; }
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SITE=$(mktemp -d)  # the carried wheels are installed here for this run only
trap 'rm -rf "$SITE"' EXIT
export PYTHONPATH="$PWD/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
IMPLS="naive torch_lce trl liger cce fused_sft fused_dft fused_target_sft_top64"
if [ "$MODE" = gpu ]; then
  DEVICE=cuda SHAPES="qwen llama3_8b" NS="--n 8192" DTYPE=bf16 SIZE=gpu
else
  DEVICE=cpu SHAPES=tiny NS="" DTYPE=fp32 SIZE=tiny
fi
STEPS=(
  "TARGETSFT_TEST_DEVICE=$DEVICE $PY -m pytest tests/scale/test_cuda.py -p no:cacheprovider -o addopts= -q --junitxml=$OUT/cuda_tests.xml"
  "$PY bench/bench_fused.py --device $DEVICE --dtype $DTYPE --shapes $SHAPES $NS --impls $IMPLS --csv $OUT/fused.csv --no-report"
  "$PY bench/gpu_train_check.py $OUT --size $SIZE"
  "$PY bench/gpu_summary.py $OUT"
)
failed=()

echo "== step 0: the carried wheels and what this machine has ($MODE mode, $PY)"
"$PY" bench/gpu_wheels.py --check || failed+=("0: .whl/ (python bench/gpu_wheels.py builds it)")
if [ "$DRY" = 0 ] && [ -f .whl/requirements.txt ]; then
  "$PY" -m pip install -q --no-index --no-deps --find-links .whl --target "$SITE" --upgrade -r .whl/requirements.txt \
    || failed+=("0: pip install of .whl/")
fi
"$PY" bench/gpu_env.py "$OUT" --site "$SITE" $([ "$DRY" = 1 ] && echo --dry-run) || failed+=("0: environment")
if [ "$DRY" = 1 ]; then
  for i in "${!STEPS[@]}"; do echo "== step $((i + 1)): ${STEPS[$i]}"; done
  "$PY" bench/gpu_train_check.py "$OUT" --size "$SIZE" --dry-run
  [ ${#failed[@]} -eq 0 ] || printf 'missing: %s\n' "${failed[@]}"
  exit 0
fi
if [ "$MODE" = gpu ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "no CUDA device here: use --cpu (the rehearsal) or --dry-run" >&2
  exit 2
fi
for i in "${!STEPS[@]}"; do
  echo "== step $((i + 1)): ${STEPS[$i]}"
  start=$SECONDS
  bash -c "${STEPS[$i]}" 2>&1 | tee "$OUT/step-$((i + 1)).log"
  rc=${PIPESTATUS[0]}
  echo "   step $((i + 1)) exit $rc after $((SECONDS - start)) s"
  [ "$rc" = 0 ] || failed+=("$((i + 1)): exit $rc (see $OUT/step-$((i + 1)).log)")
done
if [ ${#failed[@]} -gt 0 ]; then
  printf 'failed step %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "done: $OUT/summary.md"
