#!/usr/bin/env bash
# PPO vs GRPO vs RLOO vs REINFORCE++ vs DPO on the quickstart (clickbait, SmolLM2-135M-Instruct in 4-bit), from ONE
# SFT adapter and ONE reward model, so the rows differ only in the algorithm. Each algorithm's stage uses the
# quickstart's own overrides (lowrank_rlhf.commands.quickstart.ALGORITHMS); `lowrank-rlhf quickstart --algorithm X` runs the
# same settings end to end (with its own SFT and reward model).
# Usage: bash scripts/compare_algorithms.sh [OUT_DIR]   (default runs/compare; writes OUT_DIR/algorithms.{json,md})
#   ALGORITHMS="ppo grpo" picks the rows; SEEDS="0 1 2" repeats each algorithm's stage with seed=N (prompt order,
#   sampling keys, fresh heads) from the same SFT adapter and reward model: seed 0 in OUT_DIR/ALG, others in ALG_sN.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/compare}
CLI=(.venv/bin/python -m lowrank_rlhf)
RECIPE=recipes/quickstart-smollm2.yaml
mkdir -p "$OUT"
timed() {  # timed NAME cmd...: wall time and peak RSS of one command into $OUT/NAME.time
  local name=$1; shift
  /usr/bin/time -v -o "$OUT/$name.time" "$@" > "$OUT/$name.log" 2>&1
}
if [ ! -d "$OUT/shared/reward" ]; then
  timed sft "${CLI[@]}" train "$RECIPE" --stage sft --output-dir "$OUT/shared"
  timed reward "${CLI[@]}" train "$RECIPE" --stage reward --output-dir "$OUT/shared"
fi
for alg in ${ALGORITHMS:-ppo grpo rloo reinforce_pp dpo}; do
  for seed in ${SEEDS:-0}; do
    name=$alg; [ "$seed" = 0 ] || name=${alg}_s$seed
    [ -f "$OUT/$name/eval-clickbait.json" ] && continue
    if [ -e "$OUT/$name" ]; then  # never delete a directory: a half-finished run may hold someone's files
      echo "error: $OUT/$name exists without eval-clickbait.json; move it away and rerun" >&2; exit 2
    fi
    cp -r "$OUT/shared" "$OUT/$name"
    mapfile -t overrides < <(.venv/bin/python -c \
      "from lowrank_rlhf.commands.quickstart import ALGORITHMS; [print(o) for o in ALGORITHMS['$alg']]")
    stage=ppo; [ "$alg" = dpo ] && stage=dpo
    timed "$name" "${CLI[@]}" train "$RECIPE" --stage "$stage" --output-dir "$OUT/$name" "seed=$seed" "${overrides[@]}"
    "${CLI[@]}" eval "$OUT/$name" --task clickbait > "$OUT/$name-eval.log" 2>&1
  done
done
.venv/bin/python - "$OUT" <<'PY'
import json, re, sys
from pathlib import Path
out = Path(sys.argv[1])
def timing(name):
    text = (out / f"{name}.time").read_text()
    wall = re.search(r"Elapsed \(wall clock\) time.*: (.+)", text).group(1).strip()
    parts = [float(p) for p in wall.split(":")]
    seconds = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) / 2**20
    return round(seconds), round(rss, 2)
rows = []
def seed_of(path):
    return int(path.name.rsplit("_s", 1)[1]) if "_s" in path.name else 0
for alg in ("ppo", "grpo", "rloo", "reinforce_pp", "dpo"):
    for run in sorted([out / alg, *out.glob(f"{alg}_s*[0-9]")], key=seed_of):
        if not (run / "eval-clickbait.json").is_file():
            continue
        report = json.loads((run / "eval-clickbait.json").read_text())["results"]
        seconds, rss = timing(run.name)
        rows.append({"algorithm": alg, "seed": seed_of(run), "seconds": seconds, "peak_rss_gib": rss,
                     **{f"{k} {m}": report[k]["scores"][m] for k in report for m in report[k]["scores"]}})
sft_s, sft_rss = timing("sft") if (out / "sft.time").is_file() else (None, None)
json.dump({"rows": rows, "sft_seconds": sft_s, "sft_peak_rss_gib": sft_rss}, open(out / "algorithms.json", "w"), indent=1)
lines = ["| model | seed | held-out accuracy | exactly yes/no | few-shot accuracy | few-shot yes/no | stage wall time | stage peak RSS |",
         "|---|---|---|---|---|---|---|---|"]
first = rows[0] if rows else {}
for label in ("base", "sft"):
    if first:
        lines.append(f"| {label} | | {first[f'{label} clickbait_accuracy']:.1%} | {first[f'{label} exact_yes_no']:.1%} | "
                     f"{first[f'{label} (few-shot) clickbait_accuracy']:.1%} | {first[f'{label} (few-shot) exact_yes_no']:.1%} | | |")
for r in rows:
    lines.append(f"| {r['algorithm']} | {r['seed']} | {r['policy clickbait_accuracy']:.1%} | {r['policy exact_yes_no']:.1%} | "
                 f"{r['policy (few-shot) clickbait_accuracy']:.1%} | {r['policy (few-shot) exact_yes_no']:.1%} | "
                 f"{r['seconds']} s | {r['peak_rss_gib']} GiB |")
(out / "algorithms.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
