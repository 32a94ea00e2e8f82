#!/usr/bin/env bash
# The GPU check, in one run on a machine with an NVIDIA GPU (the project's device machine: its python3 has a CUDA
# torch and the test dependencies; nothing is downloaded):
#   1. build etc-ext in place with the CUDA kernels for the present GPU only, assert built_with_cuda(),
#   2. the CUDA variants of the op tests (none may skip),
#   3. compute-sanitizer memcheck and racecheck on scripts/gpu_sanitize.py (every kernel, odd shapes, masks),
#   4. the op benchmarks on CUDA (ours vs eager vs torch.compile, bf16 and fp16, GB/s against a measured copy),
#   5. the shipped demo models end to end on CUDA vs the CPU, and a short ETC training run on CUDA (bf16).
# Logs and results go to $OUT (default outputs/gpu_check): summary.txt, build.log, tests.log, sanitizer.log,
# e2e.log, bench.log, ops.json. Each step has its own time limit; a failed step does not stop the others,
# and the script exits 1 if any failed.
#
#   bash scripts/gpu_check.sh                 # everything
#   STEPS="build tests" bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-outputs/gpu_check}
PY=${PYTHON:-python3}
STEPS=${STEPS:-"build tests sanitizer bench e2e"}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
failed=0

# Wheels carried to a machine without internet: expecttest (opcheck's test utilities import it) and the transformers
# release the models are written for (pyproject), when the machine's own is older.
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

# step NAME LIMIT_S COMMAND...: runs COMMAND with a time limit, its output in $OUT/NAME.log, one line in summary.txt.
step() {
  local name=$1 limit=$2
  shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  local start=$SECONDS
  echo "== $name: $*" | tee -a "$OUT/summary.txt"
  timeout --signal=INT --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
  tail -n 25 "$OUT/$name.log"
  [ $rc -eq 0 ] || failed=1
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), 'transformers', transformers.__version__)"
  nproc
} 2>&1 | tee -a "$OUT/summary.txt"

CAPABILITY=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
step build 300 env ETC_EXT_CUDA=1 ETC_EXT_REQUIRE_CUDA=1 TORCH_CUDA_ARCH_LIST="$CAPABILITY" MAX_JOBS="$(nproc)" \
  bash -c "$PY setup.py build_ext --inplace && $PY scripts/check_build.py"

# -rs lists every skip: a CUDA case skipped here is a failure of the check, so it must be visible.
step tests 300 $PY -m pytest python_tests/test_cross_attn_scores.py python_tests/test_weighted_aggregate.py \
  python_tests/test_write_compressed_kv.py python_tests/test_cache.py -k cuda -q -rs -p no:cacheprovider \
  -n "${TEST_WORKERS:-8}"

step sanitizer 150 bash -c "compute-sanitizer --tool memcheck --error-exitcode 9 $PY scripts/gpu_sanitize.py && \
  compute-sanitizer --tool racecheck --error-exitcode 9 $PY scripts/gpu_sanitize.py"

step bench 420 $PY bench/run.py --sections ops --device cuda --out outputs/bench_cuda
cp outputs/bench_cuda/ops.json "$OUT/ops.json" 2>/dev/null

step e2e 240 $PY scripts/gpu_e2e.py --device cuda --questions "${E2E_QUESTIONS:-100}" --train-steps "${E2E_STEPS:-20}"

echo "== done: failed=$failed" | tee -a "$OUT/summary.txt"
exit $failed
