"""A prompt longer than the model's context is refused in one line (or cut from the left when asked), in
`generate`, `eval` and a training run's preflight."""

import warnings
from pathlib import Path

import pytest

from conftest import error_line
from lowrank_rlhf.cli import main
from lowrank_rlhf.config import ConfigError, load_recipe
from lowrank_rlhf.pipeline import preflight, run_stages

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny-cpu.yaml")
LONG = " ".join(["word"] * 50_000)  # tiny-llama reads bytes: ~250k tokens against a context of 1,024

pytestmark = pytest.mark.usefixtures("offline_single_thread")  # conftest: offline, one thread


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("long") / "run"
    run_stages(load_recipe(TINY), ["sft"], run)
    return run


def test_generate_refuses_a_prompt_past_the_context_in_one_line(sft_run, capsys):
    assert main(["generate", str(sft_run), "--prompt", LONG, "--max-new-tokens", "4"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "--prompt: 1 of 1 prompts are longer than the 1020 tokens the context leaves" in line
    assert "--truncate" in line


def test_generate_truncate_keeps_the_end_of_the_prompt_and_answers(sft_run, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["generate", str(sft_run), "--prompt", LONG, "--max-new-tokens", "4", "--truncate"]) == 0
    assert any("truncated from the left" in str(w.message) for w in caught)
    assert capsys.readouterr().out.strip() != ""


def test_generate_refuses_an_answer_length_that_leaves_no_room(sft_run, capsys):
    assert main(["generate", str(sft_run), "--prompt", "hi", "--max-new-tokens", "5000"]) == 2
    assert "leaves no room for a prompt in the model's context of 1024 tokens" in error_line(capsys.readouterr().err)


def test_eval_follows_the_recipes_rule_for_long_prompts(sft_run, tmp_path, capsys):
    held_out = tmp_path / "held.jsonl"
    held_out.write_text('{"prompt": "short one"}\n{"prompt": "' + "x" * 400 + '"}\n')
    recipe = (sft_run / "recipe.yaml").read_text().replace("long_prompts: truncate", "long_prompts: error")
    assert "long_prompts: error" in recipe
    (sft_run / "recipe.yaml").write_text(recipe)
    assert main(["eval", str(sft_run), "--held-out", str(held_out), "--reward", "lowrank_rlhf.rewards:brevity"]) == 2
    assert "--held-out: 1 of 2 prompts are longer than data.max_prompt_length=160" in error_line(
        capsys.readouterr().err)


def test_a_run_whose_prompt_and_response_cannot_fit_the_context_is_refused_before_it_starts(tmp_path):
    cfg = load_recipe(TINY, ["data.max_prompt_length=1000", "ppo.response_length=100"])
    with pytest.raises(ConfigError, match=r"data.max_prompt_length \+ ppo.response_length = 1100 tokens, past the "
                                          r"model's context of 1024"):
        preflight(cfg, ["sft", "reward", "ppo"], tmp_path / "run")
    assert not (tmp_path / "run").exists()
