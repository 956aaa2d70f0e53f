"""`lowrank-rlhf eval`: task resolution errors, and a real run (tiny-llama, one SFT step) scored on text2sql."""

import json

import pytest

from lowrank_rlhf.cli import main
from lowrank_rlhf.commands.evaluation import MARKER, resolve_task
from lowrank_rlhf.config import ConfigError, load_recipe
from lowrank_rlhf.pipeline import run_stages
from lowrank_rlhf.recipes import recipe_path
from lowrank_rlhf.run.checkpoint import write_manifest


def test_task_resolution():
    assert resolve_task("text2sql", None, None)[1][0] == "lowrank_rlhf.rewards:sql_execution"
    assert resolve_task(None, "x.jsonl", ["m:f"]) == ("x.jsonl", ["m:f"], 64)
    with pytest.raises(ConfigError, match="allowed values: clickbait, text2sql, text2sql_shapes"):
        resolve_task("sql", None, None)
    with pytest.raises(ConfigError, match="give --task"):
        resolve_task(None, "x.jsonl", None)


def test_eval_scores_base_and_sft_and_never_replaces_foreign_files(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = load_recipe(recipe_path("tiny-cpu.yaml"), ["sft.max_steps=1", "data.sft=bundled:text2sql_sft",
                                                     "data.max_samples=4", f"run_dir={run}"])
    run_stages(cfg, ["sft"], run)
    assert main(["eval", str(run), "--task", "text2sql", "--max-samples", "3", "--max-new-tokens", "4"]) == 0
    report = json.loads((run / "eval-text2sql.json").read_text())
    assert report["written_by"] == MARKER and report["rows"] == 3
    assert set(report["results"]) == {"base", "sft"}  # no PPO yet: no policy row
    assert set(report["results"]["sft"]["scores"]) == {"sql_execution", "sql_runs"}
    out = capsys.readouterr().out
    assert "sql_execution" in out
    # text2sql also reports the questions of shapes training never had, on the same models
    shapes = json.loads((run / "eval-text2sql_shapes.json").read_text())
    assert shapes["held_out"] == "bundled:text2sql_shapes_heldout" and shapes["rows"] == 3
    assert set(shapes["results"]) == {"base", "sft"} and "bundled:text2sql_shapes_heldout" in out
    assert shapes["prompts"] != report["prompts"]
    # a second eval replaces its own file; someone else's file of that name stays
    (run / "eval-clickbait.json").write_text('{"mine": 1}')
    assert main(["eval", str(run), "--task", "clickbait", "--max-samples", "2"]) == 2
    assert (run / "eval-clickbait.json").read_text() == '{"mine": 1}'


def test_clickbait_eval_adds_the_articles_few_shot_prompt(tmp_path):
    from lowrank_rlhf.commands.evaluation import FEW_SHOT_CLICKBAIT, few_shot_clickbait_prompts, first_line

    chat = [[{"role": "user", "content": "Is this headline clickbait? Answer yes or no.\nHeadline: Cats Rule"}]]
    [prompt] = few_shot_clickbait_prompts(chat)
    assert prompt.startswith("I will tell whether the following news titles are clickbait:\n1) The WORST care homes")
    assert prompt.endswith("4) You\u2019ll never believe which TV cook this cheeky chap grew up to be\nClickbait: yes\n"
                           "5) Cats Rule\nClickbait:")
    assert prompt.count("Clickbait:") == 5 and FEW_SHOT_CLICKBAIT.count("{headline}") == 1
    assert first_line(" yes\n6) Next title") == "yes" and first_line("  ") == ""
    with pytest.raises(ConfigError, match="no 'Headline:' line"):
        few_shot_clickbait_prompts([[{"role": "user", "content": "Is the sky blue?"}]])

    run = tmp_path / "run"
    cfg = load_recipe(recipe_path("tiny-cpu.yaml"), ["sft.max_steps=1", "data.max_samples=4", f"run_dir={run}"])
    run_stages(cfg, ["sft"], run)
    assert main(["eval", str(run), "--task", "clickbait", "--max-samples", "2"]) == 0
    report = json.loads((run / "eval-clickbait.json").read_text())
    assert set(report["results"]) == {"base", "base (few-shot)", "sft", "sft (few-shot)"}
    few = report["results"]["base (few-shot)"]
    assert len(few["answers"]) == 2 and all("\n" not in a for a in few["answers"])
    assert set(few["scores"]) == {"clickbait_accuracy", "exact_yes_no"}


def test_eval_adds_the_best_policy_and_says_when_it_was_chosen_on_the_same_prompts(tmp_path, capsys):
    """RUN/best answers through the policy adapter's slot: its answers are those of a run whose policy *is* that
    adapter, the final policy's stay its own, and choosing on the very prompts being scored is said aloud."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    cfg = load_recipe(recipe_path("tiny-cpu.yaml"), ["sft.max_steps=1", "data.sft=bundled:text2sql_sft",
                                                     "data.max_samples=4", f"run_dir={run}",
                                                     "data.eval_prompts=bundled:text2sql_heldout"])
    run_stages(cfg, ["sft"], run)
    shutil.copytree(run / "sft", run / "policy")
    (run / "best").mkdir()
    shutil.copytree(run / "sft", run / "best" / "policy")
    weights = run / "best" / "policy" / "adapter_model.safetensors"
    generator = torch.Generator().manual_seed(0)
    save_file({k: v + torch.randn(v.shape, generator=generator) for k, v in load_file(str(weights)).items()},
              str(weights))
    write_manifest(weights.parent)  # a deliberate edit, sealed again (loaders refuse an adapter its manifest denies)
    (run / "best" / "best.json").write_text('{"step": 3, "metric": "eval/sql_execution", "value": 0.5}')
    twin = tmp_path / "twin"  # the same run with the best adapter as its final policy
    shutil.copytree(run, twin)
    shutil.rmtree(twin / "policy")
    shutil.move(twin / "best" / "policy", twin / "policy")
    shutil.rmtree(twin / "best")

    args = ["--task", "text2sql", "--max-samples", "3", "--max-new-tokens", "6"]
    assert main(["eval", str(run), *args]) == 0
    out = capsys.readouterr().out
    assert main(["eval", str(twin), *args]) == 0
    mine = json.loads((run / "eval-text2sql.json").read_text())
    twins = json.loads((twin / "eval-text2sql.json").read_text())
    assert list(mine["results"]) == ["base", "sft", "policy", "best (step 3)"] and "best (step 3)" not in twins
    assert mine["results"]["best (step 3)"]["answers"] == twins["results"]["policy"]["answers"]
    assert mine["results"]["policy"]["answers"] == mine["results"]["sft"]["answers"] != twins["results"]["policy"][
        "answers"]
    assert mine["best"]["chosen_on"] == "bundled:text2sql_heldout"
    assert "these same prompts, so its row here is not a held-out measure" in out
    # a caller's model gets its own final policy back
    from lowrank_rlhf.commands.evaluation import evaluate_run, load_run_roles
    from lowrank_rlhf.commands.inference import run_recipe

    model = load_run_roles(run, run_recipe(run))
    before = {n: p.clone() for n, p in model.peft.named_parameters() if ".policy." in n}
    evaluate_run(run, "text2sql", max_samples=3, max_new_tokens=6, model=model)
    assert before and all(torch.equal(p, before[n]) for n, p in model.peft.named_parameters() if n in before)


def test_a_best_policy_equal_to_the_final_one_is_not_answered_twice(tmp_path, monkeypatch):
    """When RUN/best holds the final policy's very weights (the best step was the last), its row reuses the
    policy's answers instead of generating them again; an edited best adapter is still answered on its own."""
    import shutil

    from lowrank_rlhf.commands import evaluation

    run = tmp_path / "run"
    cfg = load_recipe(recipe_path("tiny-cpu.yaml"), ["sft.max_steps=1", "data.sft=bundled:text2sql_sft",
                                                     "data.max_samples=4", f"run_dir={run}"])
    run_stages(cfg, ["sft"], run)
    shutil.copytree(run / "sft", run / "policy")
    (run / "best").mkdir()
    shutil.copytree(run / "sft", run / "best" / "policy")
    (run / "best" / "best.json").write_text('{"step": 5, "metric": "eval/sql_execution", "value": 0.5}')
    generated = []
    real = evaluation.greedy_answers
    monkeypatch.setattr(evaluation, "greedy_answers", lambda model, role, *a: generated.append(role) or real(
        model, role, *a))
    report = evaluation.evaluate_run(run, "text2sql", max_samples=3, max_new_tokens=6)
    assert generated == ["base", "sft", "policy"]
    assert report["results"]["best (step 5)"] == report["results"]["policy"]
    assert report["best"]["chosen_on"] == cfg.data.eval_prompts

    weights = run / "best" / "policy" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b" ")  # one byte differs: another adapter, answered itself
    write_manifest(weights.parent)
    generated.clear()
    evaluation.evaluate_run(run, "text2sql", max_samples=3, max_new_tokens=6)
    assert generated == ["base", "sft", "policy", "policy"]
