# Sourced by scripts/gpu_session.sh and scripts/gpu_grpo_session.sh (a lent GPU machine without network, see
# ../shared/gpu/README.md): unpack the carried site-packages, set the paths, record the machine; run one bench.

gpu_setup() {  # gpu_setup SITE_TGZ [EXTRA_PYTHONPATH]: needs $OUT
    mkdir -p "$OUT" .site && tar xzf "$1" -C .site
    export PYTHONPATH=$PWD/.site${2:+:$2}:$PWD PYTHONUNBUFFERED=1
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; git log -1 --oneline || true; date -u; } \
        | tee "$OUT/device.txt"
}

bench_into() {  # bench_into DIR NAME SECONDS ARGS...: DIR/NAME.json (+ .md, .png) and DIR/NAME.log, killed after SECONDS
    local dir=$1 name=$2 seconds=$3; shift 3
    mkdir -p "$dir"
    timeout -s KILL "$seconds" python3 -m lowrank_rlhf.bench --json "$dir/$name.json" "$@" > "$dir/$name.log" 2>&1
    local rc=$?
    tail -c 2500 "$dir/$name.log"
    return $rc
}
