#!/usr/bin/env bash
# Produces docs/swap_results.md with `kvsched simulate` itself: preemption by swap against recompute
# on the built-in chat and decode_heavy workloads (strict and lax SLOs), and with priorities that
# change while requests run, over several seeds (workload draws). About 5 minutes on 2 cores.
# Usage: bash bench/swap_results.sh [number of seeds, default 5]
set -euo pipefail
seeds=${1:-5}
out="$(mktemp -d)"
for seed in $(seq 0 $((seeds - 1))); do
  for mode in recompute swap; do
    for slo in strict lax; do
      ${KVSCHED:-kvsched} simulate --seeds 1 --rate 7 --slo "$slo" --preemption "$mode" --seed "$seed" \
        --json "$out/memory-chat-$slo-$mode-$seed.json" > /dev/null
      ${KVSCHED:-kvsched} simulate --seeds 1 --workload decode_heavy --num-requests 1000 --rate 7 --kv-capacity-tokens 32768 \
        --slo "$slo" --preemption "$mode" --seed "$seed" --json "$out/memory-decode_heavy-$slo-$mode-$seed.json" > /dev/null
    done
    for kind in markov random; do
      ${KVSCHED:-kvsched} simulate --seeds 1 --rate 7 --slo strict --priorities "$kind" --preemption "$mode" --seed "$seed" \
        --admission aggressive,past_future,oracle --json "$out/priorities-$kind-strict-$mode-$seed.json" > /dev/null
    done
  done
done
python "$(dirname "$0")/format_swap_results.py" "$out"/*.json > "$(dirname "$0")/../docs/swap_results.md"
echo "wrote docs/swap_results.md from $out"
