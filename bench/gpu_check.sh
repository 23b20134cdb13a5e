#!/usr/bin/env bash
# The prepared GPU check: one command on a fresh NVIDIA GPU machine, from the repository root:
#
#     bench/gpu_check.sh
#
# It builds lorm_ext for the GPU present only, runs the whole test suite with the custom kernels
# (LORM_EXT_CUDA_KERNELS=custom) and the CUDA tests with the ATen implementation (=aten), runs
# compute-sanitizer memcheck and racecheck on a few small kernel tests, and runs bench/bench_gpu.py capped at
# 210 s (settings estimated, not yet timed on a GPU; the JSON keeps every finished row). Every log, the
# benchmark JSON and summary.txt go to one folder:
# $OUT when set, else bench/results/gpu_check. Each step has a time cap, and a deadline keeps the whole run
# under GPU_CHECK_SECONDS (default 530 s, under 9 minutes); a step that would start past it is skipped.
# Exit status: 0 when every step passed, 1 when one failed, timed out or was skipped, 2 without a GPU.
#
# PYTHON (default python3) is the interpreter whose torch is used; the machine needs nvcc, pytest and the
# project's dependencies, and no internet (the install is --no-build-isolation --no-deps).
# GPU_CHECK_WORKERS (default 4; 0: none) pytest-xdist processes for the whole suite, where xdist is installed.
set -uo pipefail

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
  echo "gpu_check: no CUDA GPU here ($PY cannot import torch, or torch.cuda.is_available() is False); nothing was run" >&2
  exit 2
fi

cd "$(dirname "$0")/.."
DIR=${OUT:-bench/results/gpu_check}
mkdir -p "$DIR"
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_SECONDS:-530}))
STEPS=()

# step NAME CAP_SECONDS LOG COMMAND...: runs COMMAND with its output appended to LOG, for at most CAP seconds
# and never past the deadline; records "NAME status seconds LOG".
step() {
  local name=$1 cap=$2 log=$3
  shift 3
  local left=$((DEADLINE - $(date +%s)))
  local limit=$((cap < left ? cap : left))
  if ((limit < 15)); then
    STEPS+=("$name|skipped (deadline)|0|$log")
    echo "== $name: skipped, $left s left before the deadline"
    return
  fi
  echo "== $name (at most $limit s) -> $log"
  local t0=$(date +%s)
  { echo "## $name: $*"; echo "## limit ${limit} s, started $(date -u +%FT%TZ)"; } >>"$DIR/$log"
  timeout --kill-after=10 "$limit" "$@" >>"$DIR/$log" 2>&1
  local rc=$? status
  case $rc in
    0) status=passed ;;
    124 | 137) status="TIMED OUT after ${limit} s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  local took=$(($(date +%s) - t0))
  echo "## $name: $status in $took s" >>"$DIR/$log"
  STEPS+=("$name|$status|$took|$log")
  echo "   $status in $took s"
}

# The machine, then the build for this GPU's architecture only.
CAPABILITY=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
{
  echo "## machine"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1
  "$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name())'
  (command -v nvcc >/dev/null && nvcc --version | tail -n 2) || echo "nvcc not on PATH (setup.py looks in /usr/local/cuda)"
  echo "cpus $(nproc); TORCH_CUDA_ARCH_LIST=$CAPABILITY"
} >"$DIR/build.log" 2>&1
step build 300 build.log env TORCH_CUDA_ARCH_LIST="$CAPABILITY" MAX_JOBS="$(nproc)" LORM_EXT_CUDA=1 \
  "$PY" -m pip install --no-build-isolation --no-deps -v -e .
if [[ ${STEPS[-1]} != "build|passed|"* ]]; then
  echo "gpu_check: the build did not pass, so nothing else ran; see $DIR/build.log" >&2
else
  # The whole suite with the custom kernels: the run that may make them the default. Most of its time is CPU
  # tests, so pytest-xdist (where installed) spreads the files over GPU_CHECK_WORKERS processes.
  WORKERS=()
  if ((${GPU_CHECK_WORKERS:-4} > 0)) && "$PY" -c 'import xdist' >/dev/null 2>&1; then
    WORKERS=(-n "${GPU_CHECK_WORKERS:-4}" --dist loadfile)
  fi
  step "tests, custom kernels (whole suite)" 240 tests_custom.log env LORM_EXT_CUDA_KERNELS=custom \
    "$PY" -m pytest -q -p no:cacheprovider -rfEs "${WORKERS[@]}" tests
  # The CUDA tests (the cuda device parameter, tests/test_cuda_kernel*.py) with the ATen implementation.
  step "tests, aten (CUDA tests)" 100 tests_aten.log env LORM_EXT_CUDA_KERNELS=aten \
    "$PY" -m pytest -q -p no:cacheprovider -rfEs tests -k cuda

  # compute-sanitizer on small tests of every custom kernel; no caching allocator, so that an access past
  # the end of a tensor reaches memory nobody allocated.
  SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
  SMALL="test_many_pairs_of_mixed_widths_in_one_call or test_more_pairs_than_one_launch_holds \
or test_row_splits_and_repeated_gram or test_strided_and_batched_inputs or test_empty_inputs_leave_grams_unchanged \
or test_merge_entries_sharing_accumulators or test_merge_with_many_layers_spans_several_launches \
or test_implementations_agree_on_gram_stats or (test_projected_accumulate_matches_float64 and 17)"
  RACE="(test_tensor_core_gram_matches_float64 and 3152-130) or test_fp32_input_is_exact_fma_not_tf32 \
or test_row_splits_and_repeated_gram or test_merge_is_bitwise_reproducible or test_implementations_agree_on_gram_stats"
  if [[ -n $SANITIZER ]]; then
    for tool in memcheck racecheck; do
      selection=$([[ $tool == memcheck ]] && echo "$SMALL" || echo "$RACE")
      step "compute-sanitizer $tool" 75 sanitizer.log env LORM_EXT_CUDA_KERNELS=custom PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        "$SANITIZER" --tool "$tool" --error-exitcode 1 --print-limit 20 \
        "$PY" -m pytest -q -x -p no:cacheprovider tests/test_cuda_kernels.py -k "$selection"
    done
  else
    STEPS+=("compute-sanitizer|skipped (not found)|0|sanitizer.log")
    echo "compute-sanitizer not found on PATH or in /usr/local/cuda/bin" >>"$DIR/sanitizer.log"
  fi

  # Both implementations, both sections; r = 16, K = 10 and 100, the authors'-style loop included.
  step "bench_gpu.py" 210 bench.log "$PY" bench/bench_gpu.py --clients 10 100 --ranks 16 --repeats 10 \
    --out "$DIR/gpu.json"
fi

{
  echo "# gpu_check on $("$PY" -c 'import torch; print(torch.cuda.get_device_name())'), $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "# wall time $(($(date +%s) - START)) s; folder $DIR"
  printf '| %-40s | %-26s | %5s | %-18s |\n' step result s log
  for entry in "${STEPS[@]}"; do
    IFS='|' read -r name status took log <<<"$entry"
    printf '| %-40s | %-26s | %5s | %-18s |\n' "$name" "$status" "$took" "$log"
  done
  for log in tests_custom.log tests_aten.log; do
    [[ -f $DIR/$log ]] && echo "$log: $(grep -E '(passed|failed|error|skipped|no tests ran).* in [0-9.]+s' "$DIR/$log" | tail -n 1)"
  done
  [[ -f $DIR/bench.log ]] && { echo; grep -E '^\||^ceilings|^# ' "$DIR/bench.log" | tail -n 40; }
} >"$DIR/summary.txt"
cat "$DIR/summary.txt"
for entry in "${STEPS[@]}"; do
  [[ $entry == *"|passed|"* ]] || exit 1
done
exit 0
