"""The quickstart: SFT -> reward model -> PPO on the embedded SmolLM2-135M-Instruct, on the clickbait test.

Asked "Is this headline clickbait? Answer yes or no.", the model must answer exactly `yes` or `no` (LLaMA 7B and
13B failed that format in the article this project started from). The quickstart reports, on held-out headlines,
the learned reward and an independent check of its own: the share of answers that are exactly yes/no, and their
accuracy against the labels, for the base, after SFT and after PPO.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from . import data
from .config import RecipeConfig, load_recipe
from .pipeline import load_roles, run_stages
from .models.roles import BASE, REFERENCE, RoleModel
from .recipes import recipe_path
from .rl.rollout import response_mask as rollout_response_mask

log = logging.getLogger(__name__)

# The quickstart's settings live in one place: the shipped recipes/quickstart-smollm2.yaml.
RECIPE = "quickstart-smollm2.yaml"
# --smoke: the same path, a few steps of each stage, for CI (about two minutes on 2 CPU cores).
SMOKE = ["data.max_samples=16", "sft.max_steps=2", "reward_model.max_steps=2", "ppo.total_steps=2",
         "ppo.rollout_batch_size=4", "ppo.num_ppo_epochs=1", "ppo.num_mini_batches=1", "ppo.save_steps=0"]


def quickstart_recipe(smoke: bool = False, run_dir: str | Path = "runs/quickstart") -> RecipeConfig:
    smoke = smoke or os.environ.get("LOWRANK_RLHF_SMOKE") == "1"
    return load_recipe(recipe_path(RECIPE), (SMOKE if smoke else []) + [f"run_dir={run_dir}"])


@torch.no_grad()
def evaluate(model: RoleModel, role: str, prompts: list[list[int]], texts: list[str], labels: list[str],
             max_new_tokens: int = 6) -> dict:
    """Greedy answers under `role`, their learned reward, and the independent checks (format, accuracy)."""
    tok = model.tokenizer
    ids, mask = data.left_pad(prompts, tok.pad_token_id)
    ids, mask = ids.to(model.device), mask.to(model.device)
    out = model.generate(role, ids, mask, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=tok.eos_token_id)
    responses = out[:, ids.shape[1]:]
    response_mask, _ = rollout_response_mask(responses, tok.eos_token_id)
    reward = None
    if "reward" in model.roles:
        reward = model.rewards(torch.cat([ids, responses], 1), torch.cat([mask, response_mask], 1),
                               micro_batch=16).mean().item()
    answers = tok.batch_decode(responses * response_mask + tok.pad_token_id * (1 - response_mask),
                               skip_special_tokens=True)
    normalized = [data.normalize_answer(a) for a in answers]
    exact = [a in ("yes", "no") for a in normalized]
    correct = [a == label for a, label in zip(normalized, labels)]
    return {"learned_reward": reward, "exact_yes_no": sum(exact) / len(exact), "accuracy": sum(correct) / len(correct),
            "answers": answers, "prompts": texts}


def plot_curves(metrics_path: Path, out: Path) -> None:
    # A bare Figure needs no pyplot backend, so a notebook's inline plotting is left alone.
    from matplotlib.figure import Figure

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows]
    fig = Figure(figsize=(9, 3.2))
    axes = fig.subplots(1, 2)
    axes[0].plot(steps, [r["objective/scores"] for r in rows], marker="o")
    axes[0].set(title="score (learned reward)", xlabel="PPO step")
    axes[1].plot(steps, [r["objective/kl"] for r in rows], marker="o", color="tab:red")
    axes[1].set(title="KL(policy || sft)", xlabel="PPO step")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def format_table(results: dict) -> str:
    rows = [("model", "learned reward", "exactly yes/no", "accuracy")]
    for name, r in results.items():
        reward = "n/a" if r["learned_reward"] is None else f"{r['learned_reward']:+.3f}"
        rows.append((name, reward, f"{r['exact_yes_no']:.0%}", f"{r['accuracy']:.0%}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)


def run_quickstart(output_dir: Path = Path("runs/quickstart"), smoke: bool = False, overwrite: bool = False,
                   show_samples: int = 6) -> dict:
    started = time.perf_counter()
    cfg = quickstart_recipe(smoke, output_dir)
    run_dir = Path(cfg.run_dir)
    run_stages(cfg, ["sft", "reward", "ppo"], run_dir, overwrite=overwrite)

    model = load_roles(cfg, run_dir)
    held_out = data.load_prompts(cfg.data.eval_prompts, cfg.data.max_samples)
    texts = data.prompt_texts(held_out, model.tokenizer)
    prompts = data.encode_prompts(held_out, model.tokenizer, cfg.data.max_prompt_length, cfg.data.long_prompts)
    labels = held_out["label"]
    # RUN/policy is the PPO-trained policy, RUN/sft the reference, no adapter at all is the base
    results = {"base": evaluate(model, BASE, prompts, texts, labels),
               "after SFT": evaluate(model, REFERENCE, prompts, texts, labels)}
    results["after PPO"] = evaluate(model, "policy", prompts, texts, labels)

    print("\nHeld-out headlines (before SFT -> after SFT -> after PPO):")
    headlines = [p["content"].split("Headline: ")[-1] for p in (row[0] for row in held_out["prompt"])]
    for i in range(min(show_samples, len(texts))):
        answers = " | ".join(repr(results[k]["answers"][i].strip()[:40]) for k in results)
        print(f"  [{labels[i]:>3}] {headlines[i][:60]:<60}  {answers}")
    table = format_table(results)
    print("\n" + table)
    plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    report = {"smoke": smoke, "seconds": round(time.perf_counter() - started, 1),
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch_threads": torch.get_num_threads(), "held_out": len(texts),
              "results": {k: {m: v for m, v in r.items() if m != "prompts"} for k, r in results.items()}}
    (run_dir / "report.json").write_text(json.dumps(report, indent=1))
    print(f"\nreport: {run_dir / 'report.json'}   curves: {run_dir / 'curves.png'}   ({report['seconds']} s)")
    return report
