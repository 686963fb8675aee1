#!/usr/bin/env bash
# Produces docs/results.md with `kvsched simulate` itself: for each workload and SLO, every
# admission mode's highest load meeting 90% attainment and its latencies at the workload's load
# (rate scale 1), as means and 95% intervals over three seeds, with each mode's paired difference
# from aggressive. Built-in workloads run at their defaults (WorkloadDefaults).
# Usage: bash bench/simulate_results.sh [path to ../shared/data/traces] (about 30 minutes on 2 cores)
set -euo pipefail
traces="${1:-$(dirname "$0")/../../shared/data/traces}"
out="$(mktemp -d)"
n=1000
run() {  # name, SLO, args...
  local name="$1" slo="$2"; shift 2
  ${KVSCHED:-kvsched} simulate --seeds 3 --slo "$slo" --find-max-rate --num-requests $n \
    --json "$out/$name-$slo.json" "$@" > /dev/null
}
all() {  # every workload under one SLO
  local slo="$1"
  run azure_conv "$slo" --trace "$traces/AzureLLMInferenceTrace_conv.csv" --kv-capacity-tokens 65536
  run azure_code "$slo" --trace "$traces/AzureLLMInferenceTrace_code.csv" --kv-capacity-tokens 65536
  run mooncake "$slo" --trace "$traces/mooncake_synthetic_trace.jsonl" --max-model-len 131072 --rate-scale 0.1
  run sharegpt "$slo" --trace "$traces/sharegpt_8k_filtered_stats_llama2_tokenizer.csv" --rate 2 --kv-capacity-tokens 65536
  for workload in chat decode_heavy long_context multi_turn long_prompt; do
    run "$workload" "$slo" --workload "$workload"
  done
}
all lax & lax=$!
all strict & strict=$!
wait $lax && wait $strict
python "$(dirname "$0")/format_results.py" "$out"/*.json > "$(dirname "$0")/../docs/results.md"
echo "wrote docs/results.md from $out"
