#!/usr/bin/env bash
# Every GPU figure of issue 15 in one short lease (a few minutes on one H100/H200-class GPU): bf16, eager and
# torch.compile, the GPU-marked tests first. Results land in $OUT (or bench/results/gpu) as JSON and Markdown.
#   bash bench/gpu.sh            # after the README's test install command
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
run() { local name=$1; shift; echo "+ $*"; "$@" 2>&1 | tee "$out/$name.md"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
run tests python -m pytest -m gpu -q -p no:cacheprovider tests
common=(--device cuda --dtype bfloat16)
run layer python bench/layer.py "${common[@]}" --shapes 576:1536,4096:14336 --tokens 4096 --repeats 5 --json "$out/layer.json"
run train_step python bench/train_step.py "${common[@]}" --repeats 5 --json "$out/train_step.json"
run generation python bench/generation.py "${common[@]}" --batches 1,8,32 --repeats 3 --json "$out/generation.json"
run generation_compiled python bench/generation.py "${common[@]}" --batches 1,8,32 --repeats 3 --compile \
    --json "$out/generation_compiled.json"
run decode_layer python bench/decode_layer.py "${common[@]}" --batches 1,8,32 --repeats 10 --json "$out/decode_layer.json"
run sparsity python bench/sparsity.py "${common[@]}" --repeats 5 --json "$out/sparsity.json"
