#!/usr/bin/env bash
# docs/sweep_results.md: `kvsched simulate --sweep` on a shared trace (the Azure conversation trace,
# over KV capacities: its own timestamps set the load) and on a built-in workload (chat, over rate
# scales). Each sweep runs every admission mode with --seeds auto; the page embeds the printed report
# and the plot of each.
#   bash bench/sweep_results.sh          (about 15 minutes on a 2-core VM)
set -euo pipefail
cd "$(dirname "$0")/.."
traces=../shared/data/traces
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

conv=(kvsched simulate --trace "$traces/AzureLLMInferenceTrace_conv.csv" --num-requests 2000 --sweep kv)
chat=(kvsched simulate --workload chat --num-requests 1000 --sweep rate)
"${conv[@]}" --json "$tmp/conv.json" --plot docs/sweep_conv_kv.png > "$tmp/conv.txt"
"${chat[@]}" --json "$tmp/chat.json" --plot docs/sweep_chat_rate.png > "$tmp/chat.txt"

show() {  # the command as a reader would type it, with the shared trace's usual path
  echo "${*//$traces/../shared/data/traces}"
}

{
  echo "# Where the KV cache binds: load sweeps (\`bash bench/sweep_results.sh\`)"
  echo
  echo "\`kvsched simulate --sweep kv|rate\` runs every admission mode over a grid of loads and reports the SLO"
  echo "attainment at each, what bound the runs there, where the KV cache starts to bind, and each mode's max load"
  echo "at 90% attainment with its 95% interval over seeds and its gain over the first mode (aggressive, as vLLM"
  echo "admits). \`kvsched/sim/load_sweep.py\` defines each term. Produced by kvsched $(kvsched --version | cut -d' ' -f2)."
  echo
  echo "## The Azure conversation trace, over KV capacities"
  echo
  echo '```'
  echo "\$ $(show "${conv[@]}")"
  grep -v "^wrote " "$tmp/conv.txt"
  echo '```'
  echo
  echo "![attainment against KV capacity](sweep_conv_kv.png)"
  echo
  echo "## The built-in chat workload, over rate scales"
  echo
  echo '```'
  echo "\$ $(show "${chat[@]}")"
  grep -v "^wrote " "$tmp/chat.txt"
  echo '```'
  echo
  echo "![attainment against rate scale](sweep_chat_rate.png)"
} > docs/sweep_results.md
echo "wrote docs/sweep_results.md"
