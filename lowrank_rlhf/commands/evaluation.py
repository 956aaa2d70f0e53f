"""`lowrank-rlhf eval RUN`: greedy answers of the base, RUN/sft, RUN/policy and RUN/best on a held-out set, scored
by reward functions, printed as a table and written to RUN/eval-<task>.json. For clickbait each model also answers
the seed article's few-shot prompt (raw text), the test on which only LLaMA-33B kept the yes/no format.

Answers come through the rollout's own greedy path (quickstart.evaluate's approach: same stop tokens, none of the
model's generation settings) on the base the run trained on (an adapter belongs to its quantized base, DESIGN 3b).
A task is a held-out table plus the functions that score it; `--held-out` and `--reward` replace either.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from .. import data, rewards
from ..config import ConfigError
from ..models.loading import load_base
from ..models.roles import BASE, RoleModel
from ..rl.rollout import greedy_answers
from ..run.directory import EVAL_MARKER

# task -> (held-out table, reward functions (the first is the headline metric), new tokens per answer)
TASKS = {
    "clickbait": ("bundled:clickbait_heldout",
                  ["lowrank_rlhf.rewards:clickbait_accuracy", "lowrank_rlhf.rewards:exact_yes_no"], 6),
    "text2sql": ("bundled:text2sql_heldout",
                 ["lowrank_rlhf.rewards:sql_execution", "lowrank_rlhf.rewards:sql_runs"], 64),
    # questions of shapes no training question has (data/text2sql_shapes.py): what text2sql_heldout (the training
    # templates in unseen words and values) cannot tell, whether the model writes SQL beyond memorised shapes
    # 80 new tokens: its longest gold queries are 73 tokens (64 cut 11 of the 240 before their end)
    "text2sql_shapes": ("bundled:text2sql_shapes_heldout",
                        ["lowrank_rlhf.rewards:sql_execution", "lowrank_rlhf.rewards:sql_runs"], 80),
}
# `eval --task T` also reports these tasks, on the same loaded models
ALSO_REPORTED = {"text2sql": ("text2sql_shapes",)}
MARKER = EVAL_MARKER  # in every file we write: a file without it is someone else's and is never replaced

# The seed article's few-shot clickbait prompt (Enryu, "Mini-post: first look at LLaMA", 2023), its words and four
# examples verbatim; the line breaks are ours (the copy we could read had lost them). A raw-text prompt, no chat
# template: the model continues after "Clickbait:", and only the first line of its answer counts.
FEW_SHOT_CLICKBAIT = (
    "I will tell whether the following news titles are clickbait:\n"
    "1) The WORST care homes in England: Interactive map reveals the lowest-rated 2,530 residences - so is there "
    "one near you?\nClickbait: yes\n"
    "2) Netflix's top 10 most-watched movies of all time\nClickbait: yes\n"
    "3) Peering Through the Fog of Inflation\nClickbait: no\n"
    "4) You\u2019ll never believe which TV cook this cheeky chap grew up to be\nClickbait: yes\n"
    "5) {headline}\nClickbait:")
HEADLINE = "Headline: "  # the bundled chat question ends with it (data/clickbait.py)


def resolve_task(task: str | None, held_out: str | None, functions: list[str] | None) -> tuple[str, list[str], int]:
    if task is None and not (held_out and functions):
        raise ConfigError(f"eval: give --task ({' | '.join(TASKS)}) or both --held-out and --reward")
    if task is not None and task not in TASKS:
        raise ConfigError(f"eval: unknown task {task!r}; allowed values: {', '.join(TASKS)}")
    table, specs, tokens = TASKS[task] if task else (None, None, 64)
    return held_out or table, list(functions or specs), tokens


def few_shot_clickbait_prompts(chat_prompts: list) -> list[str]:
    """The article's few-shot prompt for each bundled clickbait question (its headline after "Headline: ")."""
    headlines = []
    for i, prompt in enumerate(chat_prompts):
        text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        if HEADLINE not in text:
            raise ConfigError(f"eval --task clickbait: held-out row {i} has no '{HEADLINE.strip()}' line to put "
                              f"into the few-shot prompt")
        headlines.append(text.rsplit(HEADLINE, 1)[1].strip())
    return [FEW_SHOT_CLICKBAIT.format(headline=h) for h in headlines]


def first_line(answer: str) -> str:
    return answer.strip().split("\n", 1)[0] if answer.strip() else ""


def score_answers(functions: dict, texts: list[str], answers: list[str], columns: dict) -> dict[str, float]:
    return {rewards.short_name(spec): rewards.call_reward_function(fn, texts, answers, name=spec, **columns)
            .mean().item() for spec, (fn, _) in functions.items()}


def load_run_roles(run_dir: Path, cfg) -> RoleModel:
    roles = tuple(r for r in ("sft", "policy") if (run_dir / r / "adapter_config.json").is_file())
    base, tok = load_base(cfg.model)
    if not roles:  # the base alone: still worth a number
        return RoleModel(base, tok, cfg.lora, base_name=cfg.model.name, quantization=cfg.model.quantization,
                         roles=("policy",), seed=cfg.seed)
    return RoleModel.load(base, tok, run_dir, cfg.lora, base_name=cfg.model.name,
                          quantization=cfg.model.quantization, roles=roles, trainable=())


def evaluate_run(run_dir: Path, task: str | None = None, held_out: str | None = None,
                 functions: list[str] | None = None, max_samples: int = 0, max_new_tokens: int | None = None,
                 model: RoleModel | None = None, models: tuple[str, ...] = ("base", "sft", "policy", "best"),
                 few_shot_rows: bool = True) -> dict:
    """Scores of base / sft / policy / best (those of `models` the run has) on the held-out set; writes
    RUN/eval-<name>.json. `few_shot_rows=False` skips clickbait's few-shot form (compare needs only the chat form)."""
    from .inference import context_length, run_recipe

    run_dir = Path(run_dir)
    source, specs, tokens = resolve_task(task, held_out, functions)
    name = task or Path(source.replace("bundled:", "")).stem
    out = run_dir / f"eval-{name}.json"
    if out.exists() and MARKER not in out.read_text(errors="replace")[:200]:
        raise ConfigError(f"eval: {out} exists and was not written by lowrank-rlhf eval; move it away")
    cfg = run_recipe(run_dir)
    loaded = rewards.load_reward_functions(specs, timeout_s=cfg.rewards.timeout_s)
    table = data.load_prompts(source, max_samples, name="--held-out")
    started = time.perf_counter()
    model = model or load_run_roles(run_dir, cfg)
    texts = data.prompt_texts(table, model.tokenizer)
    room = context_length(model, cfg.model.max_length) - (max_new_tokens or tokens)
    if room < 1:
        raise ConfigError(f"eval: --max-new-tokens {max_new_tokens or tokens} leaves no room for a prompt in the "
                          f"model's context of {room + (max_new_tokens or tokens)} tokens")
    # the recipe's rule for long prompts (data.long_prompts: truncate with a warning, or error), within the context
    prompts = data.encode_prompts(table, model.tokenizer, min(cfg.data.max_prompt_length, room),
                                  cfg.data.long_prompts, name="--held-out")
    columns = {c: table[c] for c in table.column_names if c != "prompt"}
    wanted = {k: v for k, v in {"base": BASE, "sft": "sft", "policy": "policy"}.items() if k in models}
    few_shot_texts = (few_shot_clickbait_prompts(list(table["prompt"]))
                      if task == "clickbait" and not held_out and few_shot_rows else [])
    few_shot = data.tokenize_prompts(few_shot_texts, model.tokenizer, cfg.model.max_length, "truncate",
                                     add_special_tokens=True) if few_shot_texts else None
    results = {}

    def answer(label: str, role: str) -> None:
        answers = greedy_answers(model, role, prompts, max_new_tokens or tokens)
        results[label] = {"scores": score_answers(loaded, texts, answers, columns), "answers": answers}
        if few_shot:  # the article's form: raw text, the first line of the continuation
            raw = [first_line(a) for a in greedy_answers(model, role, few_shot, max_new_tokens or tokens)]
            scores = score_answers(loaded, few_shot_texts, raw, columns)
            results[f"{label} (few-shot)"] = {"scores": scores, "answers": raw}

    for label, role in wanted.items():
        if role == BASE or (run_dir / role / "adapter_config.json").is_file():
            answer(label, role)
    best = read_best(run_dir) if "policy" in results and "best" in models else None
    if best and adapter_digest(run_dir / "best", "policy") == adapter_digest(run_dir, "policy"):
        # the best step was the last one: the same weights give the same greedy answers, so they are not generated
        # twice (a text-to-SQL policy takes minutes per held-out pass on a CPU)
        for label in [k for k in results if k.startswith("policy")]:
            results[label.replace("policy", f"best (step {best['step']})", 1)] = results[label]
    elif best:  # RUN/best: the policy RL chose on its eval prompts, answered with the policy adapter's slot
        model.load_adapter_weights("policy", run_dir / "best" / "policy")
        try:
            answer(f"best (step {best['step']})", "policy")
        finally:
            model.load_adapter_weights("policy", run_dir / "policy")
    if best:
        best["chosen_on"] = cfg.data.eval_prompts
    report = {"written_by": MARKER, "run": str(run_dir), "held_out": source, "rows": len(texts),
              "functions": specs, "best": best, "seconds": round(time.perf_counter() - started, 1),
              "results": results, "prompts": texts}
    print(format_table(report))
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"written: {out}")
    return report


def adapter_digest(run: Path, role: str) -> str:
    """SHA-256 of RUN/role's adapter weights; "" when there are none."""
    path = run / role / "adapter_model.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def evaluate_task(run_dir: Path, task: str | None = None, held_out: str | None = None,
                  functions: list[str] | None = None, max_samples: int = 0, max_new_tokens: int | None = None
                  ) -> list[dict]:
    """`lowrank-rlhf eval`: the task's report, then those of ALSO_REPORTED[task], all on one loaded model."""
    from .inference import run_recipe

    companions = ALSO_REPORTED.get(task, ()) if not (held_out or functions) else ()
    model = load_run_roles(Path(run_dir), run_recipe(Path(run_dir))) if companions else None
    reports = [evaluate_run(run_dir, task, held_out, functions, max_samples, max_new_tokens, model=model)]
    for other in companions:
        print()
        reports.append(evaluate_run(run_dir, other, max_samples=max_samples, max_new_tokens=max_new_tokens,
                                    model=model))
    return reports


def read_best(run_dir: Path) -> dict | None:
    """RUN/best's best.json ({"step", "metric", "value"}) when the run kept a best policy, else None."""
    path = run_dir / "best" / "best.json"
    if not (run_dir / "best" / "policy" / "adapter_config.json").is_file() or not path.is_file():
        return None
    return json.loads(path.read_text())


def format_table(report: dict) -> str:
    names = [rewards.short_name(s) for s in report["functions"]]
    rows = [("model", *names)] + [(label, *(f"{r['scores'][n]:.1%}" for n in names))
                                  for label, r in report["results"].items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    head = f"{report['held_out']}: {report['rows']} held-out prompts, greedy"
    lines = [head] + ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    best = report.get("best")
    if best:  # choosing on the very prompts it is scored on makes the best row a biased, not a held-out, number
        same = best["chosen_on"] == report["held_out"]
        lines.append(f"best: the policy at step {best['step']}, chosen on {best['metric']} of {best['chosen_on']}"
                     + (" -- these same prompts, so its row here is not a held-out measure" if same else ""))
    return "\n".join(lines)
