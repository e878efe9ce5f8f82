#!/usr/bin/env bash
# The evaluation report: the built-in SmolLM2-135M-Instruct on 100 generated arithmetic word
# problems, one worker against 2 and 4 independent workers (majority vote) and 1, 2 and 4
# Hogwild! workers (combined layout), at budgets of 32 to 256 sequential forward passes
# (one worker of this model ends its answer after about 40-200 tokens). One engine on the
# GPU runs the runs concurrently in shared forward passes, as many as fit in its K/V cache.
#
#   benchmarks/eval_report.sh [OUT]     # default OUT: benchmarks/results/DATE-DEVICE-eval
#
# Resumable: run it again with the same OUT to finish an interrupted run.
set -euo pipefail
cd "$(dirname "$0")/.."
device=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))")
out=${1:-benchmarks/results/$(date +%F)-${device}-eval}
if command -v hogwild-ray >/dev/null; then cli=(hogwild-ray); else cli=(python -m hogwild_ray); fi
"${cli[@]}" eval --generated 100 --seed 0 --workers 1,2,4 --budgets 32,64,128,256 \
    --modes single,independent,hogwild --layouts combined --device cuda --out "$out"
