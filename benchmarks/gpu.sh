#!/usr/bin/env bash
# The whole GPU check in one device call (device time is scarce): CUDA tests on the tiny models, then the
# benchmark tables in fp16 at 512², 50 steps, on the m9-sized random model with the real 250,002-row
# vocabulary (one folder for every stage; built by the first, ~1.5 min). The test-only oracles (diffusers
# 0.35.2, transformers 4.57.6, accelerate for diffusers' offload, ...) travel as wheels in .whl/ (see
# benchmarks/README.md). Each stage has its own time limit and writes its JSON after every block, so a stage
# cut short or failing still leaves the others' results in $OUT. The limits add up to ~15 minutes: with a
# 10-minute device call, run the speed stages in their own call (T_SPEED, T_SPEED_COMPILED) or shorten the others; the compile stage (two UNets, then altdiff's text encoder, VAE decoder and
# safety checker: ~3 minutes of compilation), the likeliest to run over, goes last.
set -u
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/altdiff-gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader
python3 -c "import torch, diffusers, transformers, accelerate; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'accelerate', \
accelerate.__version__)"
B="python3 -m benchmarks --device cuda --dtype fp16 --tiled-size 2048 --vocab-size 250002"
stage() { local limit=$1 name=$2; shift 2; echo "== $name"; timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | tail -25; }
stage "${T_TESTS:-80}" tests python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
stage "${T_EAGER:-150}" eager $B --json "$OUT/eager.json" --blocks text_encoder unet unet_variants vae_decode \
    safety e2e throughput
stage "${T_OFFLOAD:-90}" offload $B --json "$OUT/offload.json" --blocks offload --repeats 2
stage "${T_LOAD:-55}" load $B --json "$OUT/load.json" --blocks load e2e --repeats 2
# ToMe and DeepCache against tomesd / DeepCache (their wheels in .whl/ too), and the webui family's cost.
stage "${T_SPEED:-120}" speed $B --json "$OUT/speed.json" --blocks tome deepcache webui_family --repeats 2
stage "${T_COMPILED:-200}" compiled $B --json "$OUT/compiled.json" --blocks unet_compiled e2e_compiled --repeats 3
# ToMe and DeepCache on recorded and compiled graphs (compile=True against diffusers + package compiled).
stage "${T_SPEED_COMPILED:-200}" speed-compiled $B --json "$OUT/speed-compiled.json" --blocks tome_compiled \
    deepcache_compiled --repeats 2
