#!/usr/bin/env bash
# GPU verification of kvsched on the device machine, most important step first, each with its own
# time limit, in well under 8 minutes. No registry there: it builds with the preinstalled pybind11,
# scikit-build-core, CMake, nvcc and PyTorch.
#   bash bench/gpu/run.sh [TRACE.csv]      results under $OUT (or ./gpu-results)
# GPU_STEPS="step_copies overlap ..." runs only the steps named (the build always runs).
# TRACE is an Azure-format trace for the allocator-replay rows of the bandwidth table
# (default ../shared/data/traces/AzureLLMInferenceTrace_conv.csv when that exists).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-gpu-results}
mkdir -p "$out"
trace=${1:-../shared/data/traces/AzureLLMInferenceTrace_conv.csv}
status=0
log="$out/log.txt"
step() {  # step NAME SECONDS COMMAND...: runs it with a limit, appends its output to $out/log.txt
  local name=$1 limit=$2
  shift 2
  if [ -n "${GPU_STEPS:-}" ] && [ "$name" != build ] && [[ " $GPU_STEPS " != *" $name "* ]]; then
    return
  fi
  echo "== $name (limit ${limit}s)" | tee -a "$log"
  local began=$SECONDS
  timeout "$limit" "$@" > "$out/current.txt" 2>&1
  local rc=$?
  cat "$out/current.txt" >> "$log"
  tail -n 25 "$out/current.txt"
  rm -f "$out/current.txt"
  echo "== $name: rc=$rc in $((SECONDS - began))s" | tee -a "$log"
  [ $rc -eq 0 ] || status=1
  summary+="$name rc=$rc seconds=$((SECONDS - began))"$'\n'
}
summary=""
nvidia-smi --query-gpu=name,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv | tee "$out/gpu.txt"
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
step build 240 python3 -m pip install --no-build-isolation --no-deps -v .
python3 -c "import kvsched; print('cuda_compiled', kvsched.cuda_compiled(), 'has_cuda', kvsched.has_cuda())" | tee -a "$out/gpu.txt"
export PYTHONUNBUFFERED=1
# 1. Copies that overlap the forward pass (StepCopyRunner, the vLLM connector's worker side): the stream
#    order keeps every byte right, and what share of the copies' time the forward pass hides.
step step_copies 90 python3 -m pytest -q -p no:cacheprovider -s tests/test_step_copies_gpu.py tests/test_step_copies.py
step overlap 150 python3 bench/gpu/step_copy_overlap.py --out "$out/step_copy_overlap.json"
# 2. The module links its C++ runtime privately: symbol table and bad input on this toolchain.
step symbols_bad_input 60 python3 -m pytest -q -p no:cacheprovider tests/test_build.py tests/test_bad_input.py \
  tests/test_scheduler_bad_input.py
# 3. Bandwidth: every row against the ceiling measured in the same run.
trace_args=()
[ -f "$trace" ] && trace_args=(--trace "$trace")
step swap_bandwidth 120 python3 bench/gpu/swap_bandwidth.py "${trace_args[@]}" --out "$out/swap_bandwidth.json"
# 4. Correctness on the GPU: round trips (production sizes too) and the scheduler end to end.
export KVSCHED_GPU_REPORT="$out/scheduler_swap_gpu.jsonl"
step gpu_tests 150 python3 -m pytest -q -p no:cacheprovider -s tests/test_swap_gpu.py tests/test_scheduler_swap_gpu.py \
  tests/test_block_copier_gpu.py
unset KVSCHED_GPU_REPORT
# 5. The whole suite on this build (the vLLM adapter tests skip: no vLLM there).
step full_suite 90 python3 -m pytest -q -p no:cacheprovider -x -n 8 tests
# 6. Memory errors in the copy engine (small round trips; the production sizes are too slow under it).
step memcheck 100 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -p no:cacheprovider \
  tests/test_swap_gpu.py tests/test_step_copies_gpu.py -k "test_device_round_trip or bad_input or failed_call"
printf "%s" "$summary" | tee -a "$log"
exit $status
