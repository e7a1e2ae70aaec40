#!/usr/bin/env bash
# The whole GPU check in one device call (device time is scarce): CUDA tests on the tiny models, then the
# benchmark tables in fp16 at 512², 50 steps. Run from the repo root on the GPU machine; the test-only
# oracles (diffusers 0.35.2, transformers 4.57.6, ...) travel as wheels in .whl/ (see benchmarks/README.md).
# Each stage has its own time limit, so one failing stage still leaves the others' results in $OUT. About
# 8 minutes on an H200 (half of it compiling), inside one 10-minute device call.
set -u
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/altdiff-gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
B="python3 -m benchmarks --device cuda --dtype fp16 --tiled-size 2048"
stage() { local limit=$1 name=$2; shift 2; echo "== $name"; timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | tail -25; }
stage "${T_TESTS:-120}" tests python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_fast_unet.py
stage "${T_EAGER:-200}" eager $B --json "$OUT/eager.json" --blocks tokenizer text_encoder unet unet_variants \
    vae_decode vae_encode vae_tiled_decode safety sampler e2e e2e_tiled
stage "${T_COMPILED:-200}" compiled $B --json "$OUT/compiled.json" --blocks unet_compiled e2e_compiled
stage "${T_LOAD:-60}" load $B --json "$OUT/load.json" --blocks load --repeats 2
