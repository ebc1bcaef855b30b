#!/usr/bin/env bash
# The GPU checks in one go, for a machine with CUDA: the `gpu` tests (fp16 vs fp32, no NaN for
# SD1.5 / SD2.1-v / SDXL random weights, compile vs eager, offload, peak VRAM, and `openldm bench
# --device cuda` on SD1.5 512 px: UNet it/s and each run's peak VRAM, printed in the tests' output).
# Usage: scripts/gpu_check.sh [OUT_DIR]  (default ./gpu-check)
set -euo pipefail
out=${1:-gpu-check}
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python -m pytest -q -s -m gpu tests/gpu 2>&1 | tee "$out/gpu-tests.txt"
