#!/usr/bin/env bash
# Produces docs/results.md with `kvsched simulate` itself: for each workload and SLO set, every
# policy's highest load meeting 90% attainment and its latencies at a heavy load (rate scale 1).
# Usage: bash bench/simulate_results.sh [path to ../shared/data/traces] (about 15 minutes on 2 cores)
set -euo pipefail
traces="${1:-$(dirname "$0")/../../shared/data/traces}"
out="$(mktemp -d)"
n=1000
run() {  # name, SLO, args...
  local name="$1" slo="$2"; shift 2
  ${KVSCHED:-kvsched} simulate --seeds 1 --slo "$slo" --find-max-rate --json "$out/$name-$slo.json" "$@" > /dev/null
}
for slo in lax strict; do
  run azure_conv "$slo" --trace "$traces/AzureLLMInferenceTrace_conv.csv" --num-requests $n --kv-capacity-tokens 65536
  run azure_code "$slo" --trace "$traces/AzureLLMInferenceTrace_code.csv" --num-requests $n --kv-capacity-tokens 65536
  run mooncake "$slo" --trace "$traces/mooncake_synthetic_trace.jsonl" --num-requests $n --max-model-len 131072 --rate-scale 0.1
  run sharegpt "$slo" --trace "$traces/sharegpt_8k_filtered_stats_llama2_tokenizer.csv" --num-requests $n --rate 2 --kv-capacity-tokens 65536
  run decode_heavy "$slo" --workload decode_heavy --num-requests $n --rate 7 --kv-capacity-tokens 32768
  run multi_turn "$slo" --workload multi_turn --num-requests $n --rate 2 --think-time 10 --kv-capacity-tokens 65536
  run long_prompt "$slo" --workload long_prompt --num-requests $n --rate 1 --max-model-len 131072 --kv-capacity-tokens 400000
done
python "$(dirname "$0")/format_results.py" "$out"/*.json > "$(dirname "$0")/../docs/results.md"
echo "wrote docs/results.md from $out"
