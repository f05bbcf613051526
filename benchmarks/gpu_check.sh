#!/usr/bin/env bash
# The GPU checks, in one command on a GPU node (well under ten minutes on one GPU):
#   bash benchmarks/gpu_check.sh
# 1. tests/test_gpu.py (tiny stages in fp32/fp16/bf16, a killed GPU stage resumed, GPU against CPU
#    evaluation, the local executor on the GPU, the build's architectures) and tests/test_device.py;
# 2. a short throughput table: the demo's models trained and timed on this GPU (benchmarks/train.py,
#    run.precision auto), with EfficientAD-S at the demo's sizes beside them;
# 3. the performance suite at demo and thesis sizes with AMP (benchmarks/run.py: models, the
#    EfficientAD-AST : EfficientAD-S ratio, components), its JSON in benchmarks/results/run_<GPU name>.json.
# Everything printed is also written to benchmarks/results/gpu_check_<GPU name>.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA GPU here; run this on a GPU node" >&2
    exit 2
fi
gpu=$("$python" -c "import torch; print(torch.cuda.get_device_name(0))")
name=$(echo "$gpu" | tr -c 'A-Za-z0-9.-' '_' | sed 's/_*$//')
out="benchmarks/results/gpu_check_$name.txt"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
{
    echo "# gpu_check on $gpu, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    "$python" -c "import json, torch; from effad_hpc.utils.device import device_record; \
print(json.dumps(device_record(torch.device('cuda'))))"
    status=0
    "$python" -m pytest tests/test_gpu.py tests/test_device.py -v -p no:cacheprovider || status=$?
    "$python" benchmarks/train.py --config configs/demo.yaml --models efficientad_ast ast efficientad_s patchcore padim \
        spade --out "$scratch/run" run.device=cuda data.root="$scratch/data" || status=$?
    "$python" benchmarks/run.py --sections models ratio components --device cuda \
        --json "benchmarks/results/run_$name.json" || status=$?
    echo "# gpu_check exit status: $status"
    exit $status
} 2>&1 | tee "$out"
