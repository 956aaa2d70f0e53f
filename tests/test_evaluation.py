"""`lowrank-rlhf eval`: task resolution errors, and a real run (tiny-llama, one SFT step) scored on text2sql."""

import json

import pytest

from lowrank_rlhf.cli import main
from lowrank_rlhf.config import ConfigError, load_recipe
from lowrank_rlhf.evaluation import MARKER, resolve_task
from lowrank_rlhf.pipeline import run_stages
from lowrank_rlhf.recipes import recipe_path


def test_task_resolution():
    assert resolve_task("text2sql", None, None)[1][0] == "lowrank_rlhf.rewards:sql_execution"
    assert resolve_task(None, "x.jsonl", ["m:f"]) == ("x.jsonl", ["m:f"], 64)
    with pytest.raises(ConfigError, match="allowed values: clickbait, text2sql"):
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
    assert "sql_execution" in capsys.readouterr().out
    # a second eval replaces its own file; someone else's file of that name stays
    (run / "eval-clickbait.json").write_text('{"mine": 1}')
    assert main(["eval", str(run), "--task", "clickbait", "--max-samples", "2"]) == 2
    assert (run / "eval-clickbait.json").read_text() == '{"mine": 1}'


def test_clickbait_eval_adds_the_articles_few_shot_prompt(tmp_path):
    from lowrank_rlhf.evaluation import FEW_SHOT_CLICKBAIT, few_shot_clickbait_prompts, first_line

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
