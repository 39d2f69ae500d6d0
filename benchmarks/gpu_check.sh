#!/usr/bin/env bash
# gpu_check.sh — everything a session lent a GPU should run first, in one command, within
# about 8 minutes on one H200: build in place with the CUDA kernels, run the CUDA tests, time
# the optimizer step against torch fused AdamW and bitsandbytes 8-bit (bytes moved over the
# measured copy bandwidth), and a short CUDA `compare`. Writes one markdown report plus the
# JSON lines of every benchmark into $OUT (default gpu_check_out/).
#
#   benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
#   benchmarks/gpu_check.sh --dry-run  # print the steps and their time limits, run nothing
#
# Each step has its own time limit and its exit status goes into the report; a failing step
# does not stop the later ones (a failed test should not hide the benchmark figures). The
# script exits non-zero when any step failed. Assumes torch (CUDA), nanobind,
# scikit-build-core, cmake and ninja are installed (the lent machines have them; no registry
# is reachable there, hence --no-build-isolation --no-deps).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
OUT="${OUT:-gpu_check_out}"
PY="${PYTHON:-python}"
# H200/H100 are sm_90; building one architecture keeps the build under two minutes
export SPAM_LOWMEM_CUDA=ON SPAM_LOWMEM_CUDA_ARCHS="${SPAM_LOWMEM_CUDA_ARCHS:-90-real}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-16}"

# name | time limit (s) | command
STEPS=(
  "machine|15|nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; $PY -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name())'"
  "build|180|$PY -m pip install -q --no-build-isolation --no-deps -e . && $PY -c 'import spam_lowmem._C_cuda'"
  "cuda tests|120|$PY -m pytest -q -m cuda -x --junitxml=$OUT/cuda_tests.xml"
  "step bf16|45|$PY benchmarks/bench_step.py --device cuda --dtype bf16 --rounds 30 --out $OUT/step.jsonl"
  "step fp32|45|$PY benchmarks/bench_step.py --device cuda --dtype fp32 --rounds 30 --out $OUT/step.jsonl"
  "compare|60|spam-lowmem compare --device cuda --model micro --steps 60 --optimizers adamw,spam,stable-spam,bnb-adamw8bit --out $OUT/compare --overwrite --no-progress"
)

if [ "$DRY_RUN" = 1 ]; then
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit cmd <<<"$step"
    printf '%-11s %4ss  %s\n' "$name" "$limit" "$cmd"
  done
  exit 0
fi

mkdir -p "$OUT"
REPORT="$OUT/report.md"
{
  echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
} >"$REPORT"
failed=0
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<<"$step"
  log="$OUT/${name// /_}.log"
  start=$(date +%s)
  timeout "$limit" bash -c "$cmd" >"$log" 2>&1
  rc=$?
  secs=$(($(date +%s) - start))
  [ "$rc" -ne 0 ] && failed=1
  echo "== $name: exit $rc after ${secs}s (limit ${limit}s)"
  {
    echo "## $name — exit $rc, ${secs} s (limit ${limit} s)"
    echo
    echo '```'
    tail -n 40 "$log"
    echo '```'
    echo
  } >>"$REPORT"
done
echo "report: $REPORT"
exit "$failed"
