"""The quickstart: SFT -> reward model -> PPO on the embedded SmolLM2-135M-Instruct, on the clickbait test.

Asked "Is this headline clickbait? Answer yes or no.", the model must answer exactly `yes` or `no` (LLaMA 7B and
13B failed that format in the article this project started from). The quickstart reports, on held-out headlines,
the learned reward and an independent check of its own: the share of answers that are exactly yes/no, and their
accuracy against the labels, for the base, after SFT and after PPO.

`algorithm` (`--algorithm`) swaps the last stage: ppo (the default), the critic-free grpo, rloo and reinforce_pp
(same reward model, no value role), or dpo (sft -> DPO on the same preference pairs: no reward model, no online RL).
Each is the shipped recipe plus the overrides in ALGORITHMS, so `lowrank-rlhf train` reproduces it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from .. import data
from ..config import ConfigError, RecipeConfig, load_recipe
from ..models.loading import load_base
from ..models.roles import BASE, REFERENCE, RoleModel
from ..pipeline import run_stages, stages_for
from ..recipes import recipe_path
from ..rl.rollout import decode_responses, greedy_rollout
from .evaluation import TASKS

log = logging.getLogger(__name__)

# The quickstart's settings live in one place: the shipped recipes/quickstart-smollm2.yaml.
RECIPE = "quickstart-smollm2.yaml"
# --smoke: the same path, a few steps of each stage, for CI (about two minutes on 2 CPU cores).
SMOKE = ["data.max_samples=16", "sft.max_steps=2", "reward_model.max_steps=2", "ppo.total_steps=2",
         "ppo.rollout_batch_size=4", "ppo.num_ppo_epochs=1", "ppo.num_mini_batches=1", "ppo.save_steps=0",
         "reward_model.min_accuracy=null",  # two reward steps cannot reach the bar; smoke tests the path
         "dpo.max_steps=2"]
# What each --algorithm changes in the recipe. The critic-free ones sample 4 answers per prompt (their baseline is
# the prompt's other answers; reinforce_pp's is the batch, so 1) in 16 rollouts per step (4 prompts; PPO's 32 are
# 32 prompts: with one answer per prompt and a critic learning from scratch, 16 left PPO's final policy swinging to
# one answer in some seeds; docs/benchmarks/clickbait-sweep-validation-cpu.md), and weigh KL by beta = the recipe's
# kl_coef. dpo trains sft -> DPO on data.preferences (recipe's dpo section).
CRITIC_FREE = ["ppo.rollout_batch_size=16"]
ALGORITHMS = {
    "ppo": [],
    "grpo": ["ppo.algorithm=grpo", "ppo.num_generations=4", "ppo.beta=0.05", *CRITIC_FREE],
    "rloo": ["ppo.algorithm=rloo", "ppo.num_generations=4", "ppo.beta=0.05", *CRITIC_FREE],
    "reinforce_pp": ["ppo.algorithm=reinforce_pp", "ppo.num_generations=1", "ppo.beta=0.05", *CRITIC_FREE],
    "dpo": ["dpo.enabled=true"],
}
LABELS = {"ppo": "PPO", "grpo": "GRPO", "rloo": "RLOO", "reinforce_pp": "REINFORCE++", "dpo": "DPO"}


def algorithm_overrides(algorithm: str) -> list[str]:
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"--algorithm: unknown algorithm {algorithm!r}; allowed values: {', '.join(ALGORITHMS)}")
    return list(ALGORITHMS[algorithm])


def quickstart_recipe(smoke: bool = False, run_dir: str | Path = "runs/quickstart", algorithm: str = "ppo",
                      overrides: list[str] | tuple = ()) -> RecipeConfig:
    """The shipped recipe + the algorithm's overrides (+ SMOKE) + yours, last wins."""
    smoke = smoke or os.environ.get("LOWRANK_RLHF_SMOKE") == "1"
    return load_recipe(recipe_path(RECIPE), algorithm_overrides(algorithm) + (SMOKE if smoke else []) +
                       [f"run_dir={run_dir}", *overrides])


def report_roles(cfg: RecipeConfig, run_dir: Path) -> RoleModel:
    """The run's adapters that the report compares (policy, sft, and reward when the run trained one), frozen."""
    base, tokenizer = load_base(cfg.model)
    roles = tuple(r for r in ("policy", "sft", "reward") if (run_dir / r / "adapter_config.json").is_file())
    return RoleModel.load(base, tokenizer, run_dir, cfg.lora, base_name=cfg.model.name,
                          quantization=cfg.model.quantization, roles=roles, trainable=(), seed=cfg.seed)


@torch.no_grad()
def evaluate(model: RoleModel, role: str, prompts: list[list[int]], texts: list[str], labels: list[str],
             max_new_tokens: int = 6) -> dict:
    """Greedy answers under `role` (the rollout's own path: same stop tokens, none of the model's generation
    settings), their learned reward, and the independent checks (format, accuracy)."""
    tok = model.tokenizer
    rollout = greedy_rollout(model, role, prompts, max_new_tokens)
    reward = None
    if "reward" in model.roles:
        ids = rollout.ending_with(tok.eos_token_id)  # as the reward model was trained (Rollout.ending_with)
        reward = model.rewards(ids, rollout.attention_mask, micro_batch=16).mean().item()
    answers = decode_responses(tok, rollout)
    normalized = [data.normalize_answer(a) for a in answers]
    exact = [a in ("yes", "no") for a in normalized]
    correct = [a == label for a, label in zip(normalized, labels)]
    return {"learned_reward": reward, "exact_yes_no": sum(exact) / len(exact), "accuracy": sum(correct) / len(correct),
            "answers": answers, "prompts": texts}


def plot_curves(metrics_path: Path, out: Path) -> None:
    """Score and KL per PPO step, and the held-out health metrics (eval/*) where the run evaluated."""
    # A bare Figure needs no pyplot backend, so a notebook's inline plotting is left alone.
    from matplotlib.figure import Figure

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "objective/scores" in r]
    evals = [r for r in rows if "eval/score" in r]
    fig = Figure(figsize=(13.5 if evals else 9, 3.2))
    axes = fig.subplots(1, 3 if evals else 2)
    axes[0].plot([r["step"] for r in steps], [r["objective/raw_scores"] for r in steps], marker="o")
    axes[0].set(title="reward of the samples (before normalisation)", xlabel="PPO step")
    axes[1].plot([r["step"] for r in steps], [r["objective/kl"] for r in steps], marker="o", color="tab:red")
    axes[1].set(title="KL(policy || sft)", xlabel="PPO step")
    if evals:
        # shares (accuracy, format, top answer) on the left axis; the learned reward and the score on the right
        right = axes[2].twinx()
        for key in sorted({k for r in evals for k in r if k.startswith("eval/")} - {"eval/response_length"}):
            scale = right if key in ("eval/score", "eval/learned_reward") else axes[2]
            scale.plot([r["step"] for r in evals if key in r], [r[key] for r in evals if key in r], marker="o",
                       linestyle="--" if scale is right else "-", label=key[len("eval/"):],
                       color=f"C{sorted(evals[0]).index(key) % 10}" if key in evals[0] else None)
        axes[2].set(title="held-out prompts, greedy (dashed: right axis)", xlabel="PPO step", ylim=(0, 1.05))
        handles = axes[2].get_legend_handles_labels()
        more = right.get_legend_handles_labels()
        axes[2].legend(handles[0] + more[0], handles[1] + more[1], fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def format_table(results: dict) -> str:
    rows = [("model", "learned reward", "exactly yes/no", "accuracy")]
    for name, r in results.items():
        reward = "n/a" if r["learned_reward"] is None else f"{r['learned_reward']:+.3f}"
        rows.append((name, reward, f"{r['exact_yes_no']:.0%}", f"{r['accuracy']:.0%}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)


def format_reward_eval(evaluation: dict) -> str:
    """The reward model's held-out report (RUN/reward/eval.json) in a few lines."""
    if not evaluation:
        return "reward model: no held-out evaluation"
    lines = [f"reward model, held-out pairs: accuracy {evaluation['accuracy']:.0%}, margin {evaluation['margin']:+.2f}"
             f" ({evaluation['pairs']} pairs)"]
    for kind in sorted(k for k, v in evaluation.items() if isinstance(v, dict) and "accuracy" in v):
        v = evaluation[kind]
        lines.append(f"  {kind:>6} pairs: accuracy {v['accuracy']:.0%}, margin {v['margin']:+.2f} ({v['pairs']})")
    dep = evaluation.get("yes_minus_no")
    if dep:
        lines.append(f"  r(yes) - r(no): {dep['gap_yes']:+.2f} on yes-labelled, {dep['gap_no']:+.2f} on no-labelled "
                     f"held-out headlines ({'reads the headline' if dep['reads_prompt'] else 'IGNORES the headline'})")
    return "\n".join(lines)


def format_dpo(metrics: dict) -> str:
    """DPO's summary: TRL's implicit rewards beta * log(pi / ref) on training and held-out pairs."""
    line = (f"DPO ({metrics['steps']} steps, beta {metrics['beta']}): training pairs' reward margin "
            f"{metrics.get('rewards/margins_first', 0):+.3f} -> {metrics.get('rewards/margins_last', 0):+.3f}, "
            f"accuracy {metrics.get('rewards/accuracies_last', 0):.0%} (last step)")
    held = metrics.get("eval")
    if held:
        line += (f"\n  held-out pairs ({metrics['eval_pairs']}): margin {held['rewards/margins']:+.3f}, "
                 f"accuracy {held['rewards/accuracies']:.0%}")
    return line


def run_quickstart(output_dir: Path = Path("runs/quickstart"), smoke: bool = False, overwrite: bool = False,
                   show_samples: int = 6, algorithm: str = "ppo", overrides: list[str] | tuple = ()) -> dict:
    """Train (sft -> reward -> online RL with `algorithm`, or sft -> dpo), then compare base, SFT and the trained
    policy on the held-out headlines; writes RUN/report.json (and RUN/curves.png after online RL)."""
    started = time.perf_counter()
    cfg = quickstart_recipe(smoke, output_dir, algorithm, overrides)
    run_dir = Path(cfg.run_dir)
    summary = run_stages(cfg, stages_for(cfg), run_dir, overwrite=overwrite)
    trained = f"after {LABELS[algorithm]}"

    model = report_roles(cfg, run_dir)
    # the held-out set, never the recipe's eval_prompts: those (validation) chose RUN/best
    held_out = data.load_prompts(TASKS["clickbait"][0], cfg.data.max_samples)
    texts = data.prompt_texts(held_out, model.tokenizer)
    prompts = data.encode_prompts(held_out, model.tokenizer, cfg.data.max_prompt_length, cfg.data.long_prompts)
    labels = held_out["label"]
    # RUN/policy is the PPO-trained policy, RUN/sft the reference, no adapter at all is the base
    results = {"base": evaluate(model, BASE, prompts, texts, labels),
               "after SFT": evaluate(model, REFERENCE, prompts, texts, labels)}
    results[trained] = evaluate(model, "policy", prompts, texts, labels)

    print(f"\nHeld-out headlines (before SFT -> after SFT -> {trained}):")
    headlines = [p["content"].split("Headline: ")[-1] for p in (row[0] for row in held_out["prompt"])]
    for i in range(min(show_samples, len(texts))):
        answers = " | ".join(repr(results[k]["answers"][i].strip()[:40]) for k in results)
        print(f"  [{labels[i]:>3}] {headlines[i][:60]:<60}  {answers}")
    table = format_table(results)
    eval_path = run_dir / "reward" / "eval.json"
    reward_eval = json.loads(eval_path.read_text()) if eval_path.is_file() else {}
    first = format_dpo(summary["dpo"]) if "dpo" in summary else format_reward_eval(reward_eval)
    print("\n" + first + "\n\n" + table)
    curves = run_dir / "metrics.jsonl"
    if curves.is_file():  # online RL's per-step metrics; DPO logs TRL's instead (in the report)
        plot_curves(curves, run_dir / "curves.png")
    report = {"smoke": smoke, "algorithm": algorithm, "seconds": round(time.perf_counter() - started, 1),
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch_threads": torch.get_num_threads(), "held_out": len(texts), "reward_model": reward_eval,
              "stages": {k: v for k, v in summary.items() if k in ("sft", "reward", "dpo", "skipped")},
              "results": {k: {m: v for m, v in r.items() if m != "prompts"} for k, r in results.items()}}
    (run_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    shown = f"   curves: {run_dir / 'curves.png'}" if curves.is_file() else ""
    print(f"\nreport: {run_dir / 'report.json'}{shown}   ({report['seconds']} s)")
    return report
