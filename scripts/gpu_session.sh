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
source scripts/gpu_common.sh
gpu_setup .gpu/site.tgz

bench() {  # bench NAME ARGS...: one JSON (+ .md, .png) and log per call under $OUT (a call stays under 10 minutes)
    local name=$1; shift
    bench_into "$OUT" "$name" 590 --warmup 1 --steps 1 "$@"
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
