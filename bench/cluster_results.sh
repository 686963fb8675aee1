#!/usr/bin/env bash
# Produces docs/cluster_results.md with `kvsched simulate --instances N` itself: for fleets of 4 and
# 8 instances, every dispatch policy with and without live migration, plus the global queue, on
# memory-bound loads: the highest fleet rate meeting 90% lax attainment and the latencies at the
# workload's load, as means and 95% intervals over three seeds. Each instance has the workload's
# KV cache; past_future admission on every instance. multi_turn (where prefix affinity matters) is
# measured at its load only: its fleets step 5-10x more often per request, and a max-rate search
# there would take hours on 2 cores; so is the Azure trace on 8 instances, to keep the whole run
# within an hour.
# The page ends with the reasoning workload over equal and unequal fleets, formatted from
# bench/fleet_reasoning.json (python bench/fleet_reasoning.py; not rerun here).
# Usage: bash bench/cluster_results.sh [path to ../shared/data/traces] (about 45 minutes on 2 cores)
set -euo pipefail
traces="${1:-$(dirname "$0")/../../shared/data/traces}"
out="$(mktemp -d)"
per_instance=300  # requests per instance
run() {  # name, instances, args...
  local name="$1" n="$2"; shift 2
  ${KVSCHED:-kvsched} simulate --instances "$n" --seeds 3 --num-requests $((per_instance * n)) \
    --admission past_future --json "$out/$name-$n-policies.json" --dispatch round_robin,least_load,headroom,prefix_affinity \
    --migration both "$@" > /dev/null
  ${KVSCHED:-kvsched} simulate --instances "$n" --seeds 3 --num-requests $((per_instance * n)) \
    --admission past_future --json "$out/$name-$n-queue.json" --dispatch least_load,headroom --global-queue on \
    --migration both "$@" > /dev/null
}
fleet() {  # every workload for one fleet size; $2: the Azure trace's max-rate search (or nothing)
  local n="$1"
  run chat "$n" --workload chat --find-max-rate
  run multi_turn "$n" --workload multi_turn
  # The Azure conversation trace at N times its rate (its own rate is one instance's load).
  run azure_conv "$n" --trace "$traces/AzureLLMInferenceTrace_conv.csv" --kv-capacity-tokens 65536 --rate-scale "$n" \
    ${2:-}
}
aggressive() {  # what fleets run today: vLLM's aggressive admission on each instance
  ${KVSCHED:-kvsched} simulate --instances 4 --seeds 3 --num-requests $((per_instance * 4)) --admission aggressive \
    --json "$out/chat-4-aggressive.json" --dispatch least_load,headroom --global-queue both --migration both \
    --workload chat --find-max-rate > /dev/null
}
(fleet 4 --find-max-rate && aggressive) & four=$!
fleet 8 & eight=$!
wait $four && wait $eight
python "$(dirname "$0")/format_cluster_results.py" "$out"/*.json > "$(dirname "$0")/../docs/cluster_results.md"
echo "wrote docs/cluster_results.md from $out"
