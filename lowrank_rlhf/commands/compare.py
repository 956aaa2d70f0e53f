"""`lowrank-rlhf compare RUN [RUN ...]`: did the RL stage beat SFT, or was it lucky?

Each RUN is one seed's RL stage started from the same SFT adapter (and reward model). Every run is evaluated on the
held-out set (`eval`'s answers, reused from RUN/eval-<task>.json when there), and the per-prompt scores of the
headline metric (the task's first function) give paired statistics (paired_stats.py): per seed the gain over SFT
with its interval and McNemar's test, overall the mean gain with an interval over seeds and prompts and the sign
test over seeds. Written to OUT/compare.json, compare.md and compare.png.

`--train-from SHARED --recipe R --seeds 0 1 2` first runs the RL stage for each seed into OUT/seed-N, from a copy of
SHARED (a run directory holding sft and reward), then compares them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from .. import data, rewards
from ..config import ConfigError
from . import paired_stats
from .evaluation import MARKER, adapter_digest, evaluate_run, read_best, resolve_task

RESULT_FILES = ("compare.json", "compare.md", "compare.png")


def check_runs(runs: list[Path]) -> None:
    """Every run must exist, hold a trained policy, and share one SFT adapter (else nothing is paired)."""
    if not runs:
        raise ConfigError("compare: give at least one run directory (or --train-from with --seeds)")
    for run in runs:
        if not (run / "policy" / "adapter_config.json").is_file():
            raise ConfigError(f"compare: {run} has no trained policy (RUN/policy); finish its RL stage first")
    digests = {adapter_digest(run, "sft") for run in runs}
    if len(digests) > 1:
        raise ConfigError("compare: the runs' RUN/sft adapters differ; a paired comparison needs every seed started "
                          "from one SFT adapter (copy one SFT run, as --train-from does)")


def eval_report(run: Path, task: str | None, held_out: str | None, functions: list[str] | None,
                models: tuple[str, ...]) -> dict:
    """RUN/eval-<name>.json when it is ours, for this held-out set and has `models`' answers, else a fresh
    evaluation of those models (the chat form only)."""
    source, specs, _ = resolve_task(task, held_out, functions)
    name = task or Path(source.replace("bundled:", "")).stem
    path = run / f"eval-{name}.json"
    if path.is_file() and MARKER in path.read_text(errors="replace")[:200]:
        report = json.loads(path.read_text())
        labels = set(report["results"])
        has_best = "best" not in models or any(label.startswith("best") for label in labels) or read_best(run) is None
        if report["held_out"] == source and report["functions"] == specs and set(models) - {"best"} <= labels \
                and has_best:
            return report
    return evaluate_run(run, task, held_out, functions, models=models, few_shot_rows=False)


def per_prompt_scores(report: dict, label: str, spec: str, columns: dict) -> np.ndarray:
    """The headline metric of one model's answers, per prompt (eval stores the answers, not the per-prompt scores)."""
    fn = rewards.load_reward_functions([spec])[spec][0]
    answers = report["results"][label]["answers"]
    return rewards.call_reward_function(fn, report["prompts"], answers, name=spec, **columns).numpy()


def training_curve(run: Path) -> dict:
    """The first and last held-out-while-training evals (data.eval_prompts: the validation set) of one run."""
    path = run / "metrics.jsonl"
    evals = [m for m in (json.loads(line) for line in path.read_text().splitlines() if line.strip())
             if "eval/score" in m] if path.is_file() else []
    if not evals:
        return {}
    keys = ("eval/learned_reward", "eval/score", "eval/top_answer_share")
    return {"first": {k: evals[0].get(k) for k in keys}, "last": {k: evals[-1].get(k) for k in keys},
            "first_step": evals[0].get("step"), "last_step": evals[-1].get("step")}


def policy_label(report: dict, policy: str) -> str:
    """The eval row that stands for a seed's RL policy: the final one, or RUN/best (chosen on the run's
    eval_prompts, which must not be the held-out set: eval's table says when they are)."""
    if policy == "final":
        return "policy"
    best = [label for label in report["results"] if label.startswith("best")]
    if not best:
        raise ConfigError(f"compare --policy best: {report['run']} kept no RUN/best (set ppo.eval_steps and "
                          f"data.eval_prompts to a validation set)")
    if report["best"]["chosen_on"] == report["held_out"]:
        raise ConfigError(f"compare --policy best: {report['run']}'s RUN/best was chosen on {report['held_out']}, "
                          f"the held-out set itself; choose on a validation set")
    return best[0]


def compare_runs(runs: list[Path], out: Path, task: str | None = "clickbait", held_out: str | None = None,
                 functions: list[str] | None = None, labels: list[str] | None = None, policy: str = "final") -> dict:
    runs = [Path(r) for r in runs]
    check_runs(runs)
    check_out(out)
    source, specs, _ = resolve_task(task, held_out, functions)
    # base and SFT are the same in every run: answered once, in the first; RUN/best only when it is compared
    wanted = ("policy", "best") if policy == "best" else ("policy",)
    reports = [eval_report(run, task, held_out, functions, (("base", "sft") if i == 0 else ()) + wanted)
               for i, run in enumerate(runs)]
    table = data.load_prompts(source, name="--held-out")
    columns = {c: table[c] for c in table.column_names if c != "prompt"}
    spec = specs[0]
    base = per_prompt_scores(reports[0], "base", spec, columns)
    sft = per_prompt_scores(reports[0], "sft", spec, columns)
    chosen = [policy_label(r, policy) for r in reports]
    rl = np.stack([per_prompt_scores(r, label, spec, columns) for r, label in zip(reports, chosen)])
    result = {"written_by": MARKER, **paired_stats.compare_scores(sft, rl)}
    result.update({"held_out": source, "metric": rewards.short_name(spec),
                   "base": float(base.mean()), "base_vs_sft": paired_stats.compare_scores(base, sft[None, :]),
                   "runs": [str(r) for r in runs], "labels": labels or [r.name for r in runs], "policy": policy,
                   "training": [training_curve(r) for r in runs]})
    for seed, report, label in zip(result["seeds"], reports, chosen):  # the other metrics, e.g. exactly yes/no
        seed["all_metrics"] = report["results"][label]["scores"]
        seed["policy"] = label
    result["sft_all_metrics"] = reports[0]["results"]["sft"]["scores"]
    result["base_all_metrics"] = reports[0]["results"]["base"]["scores"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(result, indent=1) + "\n")
    markdown = format_markdown(result)
    (out / "compare.md").write_text(markdown + "\n")
    plot(result, out / "compare.png")
    print(markdown)
    print(f"written: {out / 'compare.json'}, {out / 'compare.md'}, {out / 'compare.png'}")
    return result


def check_out(out: Path) -> None:
    """Never replace a file compare did not write."""
    for name in RESULT_FILES[:2]:
        path = out / name
        if path.exists() and MARKER not in path.read_text(errors="replace")[:400]:
            raise ConfigError(f"compare: {path} exists and was not written by lowrank-rlhf compare; move it away "
                              f"or choose another --out")
    png = out / RESULT_FILES[2]
    if png.exists() and not (out / "compare.json").exists():
        raise ConfigError(f"compare: {png} exists and was not written by lowrank-rlhf compare; move it away")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def format_markdown(result: dict) -> str:
    metric, n = result["metric"], result["prompts"]
    lo, hi = result["ci95"]
    lines = [f"<!-- {MARKER} compare -->",
             f"{result['held_out']}: {n} held-out prompts, greedy; metric {metric}; "
             f"{len(result['seeds'])} RL seeds from one SFT adapter; RL = each run's "
             f"{'final policy' if result['policy'] == 'final' else 'RUN/best, chosen on validation'}",
             "", "| model | seed | " + metric + " | gain over SFT (points) | 95% interval | McNemar p |",
             "|---|---|---|---|---|---|",
             f"| base | | {_pct(result['base'])} | {_pts(result['base'] - result['sft'])} | | |",
             f"| SFT | | {_pct(result['sft'])} | | | |"]
    for label, seed in zip(result["labels"], result["seeds"]):
        s_lo, s_hi = seed["ci95"]
        lines.append(f"| RL | {label} | {_pct(seed['score'])} | {_pts(seed['gain'])} | "
                     f"[{_pts(s_lo)}, {_pts(s_hi)}] | {seed['mcnemar_p']:.3g} |")
    lines.append(f"| **RL, mean** | {len(result['seeds'])} seeds | {_pct(result['sft'] + result['mean_gain'])} | "
                 f"**{_pts(result['mean_gain'])}** | **[{_pts(lo)}, {_pts(hi)}]** | |")
    verdict = ("RL beat SFT beyond luck" if lo > 0 else "RL fell below SFT beyond luck" if hi < 0
               else "no difference from SFT that luck cannot explain")
    lines += ["", f"Seeds better / worse than SFT: {result['seeds_better']} / {result['seeds_worse']} "
              f"(sign test p = {result['sign_test_p']:.3g}). Interval: 95% bootstrap over seeds and prompts. "
              f"Verdict: {verdict}."]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    gains = [100 * s["gain"] for s in result["seeds"]]
    errors = np.array([[100 * (s["gain"] - s["ci95"][0]), 100 * (s["ci95"][1] - s["gain"])] for s in result["seeds"]]).T
    xs = np.arange(len(gains))
    ax.errorbar(xs, gains, yerr=errors, fmt="o", capsize=3, label="per seed (95%, prompts)")
    mean, (lo, hi) = 100 * result["mean_gain"], result["ci95"]
    ax.errorbar([len(gains) + 0.5], [mean], yerr=[[mean - 100 * lo], [100 * hi - mean]], fmt="s", capsize=4,
                color="black", label="mean (95%, seeds x prompts)")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(list(xs) + [len(gains) + 0.5], list(result["labels"]) + ["mean"], rotation=30, fontsize=8)
    ax.set_ylabel(f"RL - SFT, {result['metric']} (points)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train_seeds(shared: Path, recipe: str, overrides: list[str], seeds: list[int], out: Path) -> list[Path]:
    """The RL stage once per seed, each from a copy of `shared` (its sft and reward) in OUT/seed-N. A finished seed
    (RUN/policy written) is kept; an unfinished directory is an error, never deleted."""
    from ..config import load_recipe
    from ..pipeline import run_stages

    if not (shared / "sft" / "adapter_config.json").is_file():
        raise ConfigError(f"compare --train-from: {shared} has no RUN/sft; run `train --stage sft` (and reward) first")
    runs = []
    for seed in seeds:
        run = out / f"seed-{seed}"
        runs.append(run)
        if (run / "policy" / "adapter_config.json").is_file():
            continue
        if run.exists():
            raise ConfigError(f"compare: {run} exists without a finished RL stage; move it away, or resume it with "
                              f"`train {recipe} --stage ppo --output-dir {run} ppo.resume=true`")
        shutil.copytree(shared, run, ignore=shutil.ignore_patterns("checkpoint", "policy", "best", "metrics.jsonl",
                                                                   "eval-*.json", "*.lock"))
        cfg = load_recipe(recipe, [*overrides, f"seed={seed}"])
        run_stages(cfg, ["ppo"], run)
    return runs
