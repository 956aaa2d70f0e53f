#!/usr/bin/env bash
# The GPU checks of the benchmark issue, for a lent GPU machine without network (see ../shared/gpu/README.md):
# run from the repo root with `.gpu/site.tgz` carried along; results go to $OUT (the device tool's output folder).
#
#   bash scripts/gpu_session.sh tests     # the whole suite, gpu-marked tests included  (~5 min)
#   bash scripts/gpu_session.sh decode    # 7B @ 24 GiB, ours: generate() vs static-compiled decoding  (~4 min)
#   bash scripts/gpu_session.sh bench7    # 7B @ 24 GiB: ours, four-model, ours-matched  (~7 min; DECODE=... to pick)
#   bash scripts/gpu_session.sh bench13   # 13B @ 24 GiB: ours, four-model  (~5 min)
set -euo pipefail
case "${1:-}" in
    tests|decode|bench7|bench13) ;;
    *) echo "usage: bash scripts/gpu_session.sh tests|decode|bench7|bench13" >&2; exit 2 ;;
esac
OUT=${OUT:-gpu-out}
mkdir -p "$OUT" .site
tar xzf .gpu/site.tgz -C .site
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"

bench() {  # bench NAME ARGS...: one JSON (+ .md, .png) per call, written after each layout
    local name=$1; shift
    python3 -m lowrank_rlhf.bench --warmup 1 --steps 1 --json "$OUT/$name.json" "$@" 2>&1 | tee "$OUT/$name.log"
}

case "${1:-}" in
    tests)
        python3 -m pytest -q -p no:cacheprovider -rsxX tests 2>&1 | tee "$OUT/gpu_tests_full.log" ;;
    decode)
        for mode in generate static-compiled; do
            bench "decode_7b_$mode" --model llama2-7b --budget 24GiB --layouts ours --decode "$mode"
        done ;;
    bench7)
        bench bench_7b_24g --model llama2-7b --budget 24GiB --layouts ours,four-model,ours-matched \
            --decode "${DECODE:-generate}" ;;
    bench13)
        bench bench_13b_24g --model llama2-13b --budget 24GiB --layouts ours,four-model --decode "${DECODE:-generate}" ;;
esac
