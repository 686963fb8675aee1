#!/usr/bin/env bash
# GPU verification of the swap copy engines, for the device machine (no registry there: it builds
# with the preinstalled pybind11, scikit-build-core, CMake, nvcc and CuPy/PyTorch).
#   bash bench/gpu/run.sh            results under $OUT (or ./gpu-results)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-gpu-results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv | tee "$out/gpu.txt"
pip install --no-build-isolation --no-deps -q . 2>&1 | tail -5
python -c "import kvsched; print('cuda_compiled', kvsched.cuda_compiled(), 'has_cuda', kvsched.has_cuda())" | tee -a "$out/gpu.txt"
python -m pytest -q -p no:cacheprovider tests/test_swap_gpu.py tests/test_swap.py 2>&1 | tee "$out/tests.txt" | tail -15
python bench/gpu/swap_bandwidth.py --out "$out/swap_bandwidth.json" 2>&1 | tee "$out/swap_bandwidth.txt"
python bench/gpu/swap_bandwidth.py --calibrate --out "$out/swap_bandwidth_calibrated.json" 2>&1 | tee "$out/swap_bandwidth_calibrated.txt"
