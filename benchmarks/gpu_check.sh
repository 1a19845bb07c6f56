#!/usr/bin/env bash
# One lent-GPU session's checks, each part under its own time limit so a failure or a slow part
# still leaves the others' numbers (and everything printed goes to $OUT/log too). Run from the
# repository root on the device machine after /work/shared/gpu/prepare.sh made .gpu/ here:
#   carry [".gpu"]; command: bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/log") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, accelerate, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'trl', trl.__version__)"
echo "== 1. rollouts: eager against static cache + compiled decoding (SmolLM2-135M shape, bf16)"
timeout ${ROLLOUT_S:-170} python3 benchmarks/bench_rollout.py --device cuda --dtype bf16 --model smollm2 --quick --timeout 80
echo "== 2. mmdistill against TRL at equal work (full reverse KL, EMA self-teacher; batches 16/32/64)"
timeout ${COMPARE_S:-330} python3 benchmarks/compare_trl.py --device cuda --dtype bf16 --model smollm2 --objective full_rkl \
  --batch 16 32 64 --new-tokens 128 --steps 6 --warmup 2 --repeats 1 --budget $(( ${COMPARE_S:-330} - 15 )) \
  --json "$OUT/compare_trl.json"
echo "== done"
