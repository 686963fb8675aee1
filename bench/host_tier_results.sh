#!/usr/bin/env bash
# Produces docs/host_tier_results.md with `kvsched simulate` itself: the host tier of the prefix
# cache (--host-kv-tokens; written back on eviction or through when a request finishes; loaded with
# the prefill or a step ahead) against a GPU-only prefix cache of the same GPU size, and against a GPU
# cache large enough to keep every conversation (the reuse there is to be had), on the built-in
# multi_turn workload at two loads and on the shared Mooncake trace (shared prefixes). past_future
# admission, preemption by recompute, five seeds (three for the trace, whose arrivals are fixed).
# Usage: bash bench/host_tier_results.sh [path to ../shared/data/traces] (about 5 minutes on 2 cores)
set -euo pipefail
traces="${1:-$(dirname "$0")/../../shared/data/traces}"
out="$(mktemp -d)"
run() {  # name, args...
  local name="$1"; shift
  ${KVSCHED:-kvsched} simulate --admission past_future --json "$out/$name.json" "$@" > /dev/null
}
for rate in 1.75 2.5; do
  common=(--workload multi_turn --rate "$rate" --seeds 5)
  run "multi_turn@$rate-1gpu" "${common[@]}"
  run "multi_turn@$rate-2evict" "${common[@]}" --host-kv-tokens 262144 --host-cache-write evict --host-cache-load inline
  run "multi_turn@$rate-3finish" "${common[@]}" --host-kv-tokens 262144 --host-cache-write finish --host-cache-load inline
  run "multi_turn@$rate-4prefetch" "${common[@]}" --host-kv-tokens 262144 --host-cache-write finish --host-cache-load prefetch
  run "multi_turn@$rate-5large" "${common[@]}" --kv-capacity-tokens 400000
done
# A 200k-token GPU, with 1.8M tokens of host memory: the large GPU holds as much as both tiers.
common=(--trace "$traces/mooncake_synthetic_trace.jsonl" --num-requests 1000 --max-model-len 131072 --rate-scale 0.1
        --seeds 3)
run "mooncake-1gpu" "${common[@]}" --kv-capacity-tokens 200000
host=(--kv-capacity-tokens 200000 --host-kv-tokens 1800000)
run "mooncake-2evict" "${common[@]}" "${host[@]}" --host-cache-write evict --host-cache-load inline
run "mooncake-3finish" "${common[@]}" "${host[@]}" --host-cache-write finish --host-cache-load inline
run "mooncake-4prefetch" "${common[@]}" "${host[@]}" --host-cache-write finish --host-cache-load prefetch
run "mooncake-5large" "${common[@]}" --kv-capacity-tokens 2000000
python "$(dirname "$0")/format_host_tier_results.py" "$out"/*.json > "$(dirname "$0")/../docs/host_tier_results.md"
echo "wrote docs/host_tier_results.md from $out"
