"""Soak: does a long RL run stay flat in memory? Runs the RL loop on tiny-llama (4-bit, CPU) for many steps and
samples the process's RSS (and, on CUDA, allocated memory) after every step; reports the growth after warm-up.

    python scripts/soak.py --steps 500 --algorithm ppo  --out docs/benchmarks/soak-ppo-tiny-cpu
    python scripts/soak.py --steps 500 --algorithm grpo --out docs/benchmarks/soak-grpo-tiny-cpu

Writes OUT.json (every step's RSS) and OUT.md (the summary). The RL stage runs with the recipe's reward model
replaced by a Python reward (brevity), so no earlier stage is needed; checkpoints every 50 steps (as a long run
would save), evaluation off. Growth = median RSS of the last 10% of steps against the median of steps
warmup..warmup+10% (warm-up: the first 10% of steps, where allocator pools and caches fill).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--algorithm", default="ppo", choices=("ppo", "grpo", "rloo", "reinforce_pp"))
    parser.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    parser.add_argument("--run-dir", default=None, help="where the run writes (default: OUT-run)")
    args = parser.parse_args(argv)

    from lowrank_rlhf.config import load_recipe
    from lowrank_rlhf.pipeline import build_trainer

    out = Path(args.out)
    run_dir = Path(args.run_dir or f"{out}-run")
    overrides = [f"ppo.total_steps={args.steps}", "ppo.save_steps=50", "ppo.eval_steps=0", "rewards.learned_weight=0",
                 "rewards.functions=[lowrank_rlhf.rewards:brevity]", f"ppo.algorithm={args.algorithm}"]
    if args.algorithm in ("grpo", "rloo"):
        overrides.append("ppo.num_generations=2")
    cfg = load_recipe(ROOT / "recipes" / "tiny-cpu.yaml", overrides)
    torch.set_num_threads(1)
    trainer = build_trainer(cfg, run_dir, show_progress=False)
    process = psutil.Process()
    samples = []
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step()
        if trainer.step % cfg.ppo.save_steps == 0:
            trainer.save_checkpoint()
        sample = {"step": trainer.step, "rss_bytes": process.memory_info().rss,
                  "seconds": round(time.perf_counter() - start, 3)}
        if torch.cuda.is_available():
            sample["cuda_allocated_bytes"] = torch.cuda.memory_allocated()
        samples.append(sample)

    tenth = max(1, args.steps // 10)
    early = statistics.median(s["rss_bytes"] for s in samples[tenth:2 * tenth])
    late = statistics.median(s["rss_bytes"] for s in samples[-tenth:])
    summary = {"algorithm": args.algorithm, "steps": args.steps, "model": "tiny-llama 4-bit (CPU)",
               "rss_after_warmup_mib": round(early / 2**20, 1), "rss_at_end_mib": round(late / 2**20, 1),
               "growth_percent": round(100 * (late - early) / early, 2),
               "peak_rss_mib": round(max(s["rss_bytes"] for s in samples) / 2**20, 1),
               "seconds": samples[-1]["seconds"], "command": "python " + " ".join(["scripts/soak.py", *sys.argv[1:]]),
               "date": time.strftime("%Y-%m-%d"), "device": "cuda" if torch.cuda.is_available() else "cpu"}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**summary, "samples": samples}, indent=1))
    out.with_suffix(".md").write_text(
        f"# Soak: {args.algorithm}, {args.steps} steps, {summary['model']}\n\n"
        f"`{summary['command']}` ({summary['date']}, {summary['device']}, {summary['seconds']:.0f} s)\n\n"
        f"| RSS after warm-up (steps {tenth}-{2 * tenth}) | RSS over the last {tenth} steps | growth | peak |\n"
        f"|---|---|---|---|\n| {summary['rss_after_warmup_mib']} MiB | {summary['rss_at_end_mib']} MiB | "
        f"{summary['growth_percent']:+.2f}% | {summary['peak_rss_mib']} MiB |\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
