#!/usr/bin/env bash
# Everything only a GPU can show, in one run of a few minutes (for a session lent a device):
#   AGD's step against SGD/Adam on CUDA with the no-device-to-host-sync check, training
#   throughput, one --amp (bf16 autocast) run on real data, and the test suite with CUDA present.
# Usage: benchmarks/gpu_check.sh [OUTDIR]   (writes one log per part into OUTDIR, default /tmp)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp}
py=${PYTHON:-.venv/bin/python}
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device here; nothing to check" >&2
    exit 0
fi
export PYTHONUNBUFFERED=1
"$py" benchmarks/step_overhead.py --device cuda 2>&1 | tee "$out/step_overhead.log"
# Compiled and replayed as CUDA graphs, the comparison of memory traffic rather than launches.
"$py" benchmarks/step_overhead.py --device cuda --model preact-resnet18 --compile reduce-overhead \
    2>&1 | tee "$out/step_overhead_compiled.log"
"$py" benchmarks/throughput.py --device cuda --no-job 2>&1 | tee "$out/throughput.log"
"$py" -m torch_agd train --arch fcn --dataset fashion-mnist --depth 8 --width 256 --epochs 2 --amp \
    --out "$out/amp-run" 2>&1 | tee "$out/amp.log"
"$py" -m pytest -q -x tests/test_optim.py tests/test_data.py tests/test_train.py 2>&1 | tee "$out/pytest.log"
