#!/usr/bin/env bash
# Choose the quickstart's RL settings on VALIDATION only: each setting's RL stage over several seeds, every run from
# one SFT adapter and one reward model, scored by its own eval/* on data.eval_prompts (the 80 clickbait_validation
# headlines) at the last step. The held-out set is not read here; `lowrank-rlhf compare` scores the chosen runs.
# Usage: SHARED=RUN OUT=DIR SEEDS="0 1 2 3 4" LANES=2 bash scripts/clickbait_sweep.sh NAME "key=value ..." [NAME ...]
#   SHARED holds sft/ and reward/ (train --stage sft, then --stage reward); each run goes to OUT/NAME/seed-N;
#   LANES runs go at once, one torch thread each. Writes OUT/sweep.md (mean, min and each seed's validation accuracy).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${SHARED:?SHARED=run directory with sft and reward}" "${OUT:?OUT=output directory}"
SEEDS=${SEEDS:-0 1 2 3 4}; LANES=${LANES:-2}
CLI=(${PYTHON:-.venv/bin/python} -m lowrank_rlhf)
RECIPE=${RECIPE:-recipes/quickstart-smollm2.yaml}
one() {  # one NAME SEED OVERRIDES: the RL stage into OUT/NAME/seed-SEED unless it finished before
  local run="$OUT/$1/seed-$2"
  [ -f "$run/policy/adapter_config.json" ] && return 0
  if [ -e "$run" ]; then echo "error: $run exists unfinished; move it away" >&2; return 2; fi
  mkdir -p "$OUT/$1"
  cp -r "$SHARED" "$run"
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=1 /usr/bin/time -f "%e s" -o "$run.time" "${CLI[@]}" train "$RECIPE" --stage rl --output-dir "$run" \
    "seed=$2" $3 > "$run.log" 2>&1
}
jobs_file=$(mktemp)
while [ $# -ge 2 ]; do
  for seed in $SEEDS; do printf '%s\t%s\t%s\n' "$1" "$seed" "$2" >> "$jobs_file"; done
  names+=("$1"); shift 2
done
while IFS=$'\t' read -r name seed overrides; do
  while [ "$(jobs -rp | wc -l)" -ge "$LANES" ]; do sleep 5; done
  one "$name" "$seed" "$overrides" &
done < "$jobs_file"
wait
rm -f "$jobs_file"
"${CLI[0]}" - "$OUT" "${names[@]}" <<'PY'
import json, statistics, sys
from pathlib import Path
out, names = Path(sys.argv[1]), sys.argv[2:]
rows = ["| setting | seeds | validation accuracy, mean | min | per seed (first -> last eval) | top-answer share, last |",
        "|---|---|---|---|---|---|"]
for name in names:
    firsts, lasts, shares = [], [], []
    for run in sorted((out / name).glob("seed-*")):
        evals = [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                 if "eval/clickbait_accuracy" in m] if (run / "metrics.jsonl").is_file() else []
        if evals:
            firsts.append(evals[0]["eval/clickbait_accuracy"]); lasts.append(evals[-1]["eval/clickbait_accuracy"])
            shares.append(evals[-1]["eval/top_answer_share"])
    if lasts:
        per = ", ".join(f"{a:.1%}->{b:.1%}" for a, b in zip(firsts, lasts))
        rows.append(f"| {name} | {len(lasts)} | {statistics.mean(lasts):.1%} | {min(lasts):.1%} | {per} | "
                    f"{', '.join(f'{s:.2f}' for s in shares)} |")
(out / "sweep.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
PY
