"""Recipe keys as users write them, and the generated config reference (docs/config.md)."""

from pathlib import Path

import pytest

from lowrank_rlhf.cli import main
from lowrank_rlhf.commands.config_reference import MARKER, reference
from lowrank_rlhf.config import ConfigError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny-cpu.yaml")


@pytest.mark.parametrize("value", ["on", "off", "yes", "no"])
def test_on_and_off_are_the_words_they_look_like_in_overrides_and_files(tmp_path, value):
    expected = "on" if value in ("on", "yes") else "off"
    assert load_recipe(TINY, [f"memory.gradient_checkpointing={value}"]).memory.gradient_checkpointing == expected
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"memory:\n  gradient_checkpointing: {value}\n")
    assert load_recipe(recipe).memory.gradient_checkpointing == expected


def test_a_boolean_is_still_refused_where_on_and_off_are_not_choices():
    with pytest.raises(ConfigError, match="expected str"):
        load_recipe(TINY, ["model.quantization=on"])


@pytest.mark.parametrize("algorithm,batch,expected", [("grpo", 8, 4), ("rloo", 8, 4), ("grpo", 6, 2), ("ppo", 8, 1)])
def test_a_group_algorithm_without_num_generations_gets_a_working_group_size(algorithm, batch, expected):
    cfg = load_recipe(TINY, [f"ppo.algorithm={algorithm}", f"ppo.rollout_batch_size={batch}"])
    assert cfg.ppo.num_generations == expected


def test_a_group_size_the_user_gave_is_kept_and_still_checked():
    from lowrank_rlhf.config import check_algorithm

    cfg = load_recipe(TINY, ["ppo.algorithm=grpo", "ppo.num_generations=1"])
    assert cfg.ppo.num_generations == 1
    with pytest.raises(ConfigError, match="needs at least 2 samples per prompt"):
        check_algorithm(cfg.ppo)


def test_rl_is_the_online_rl_section_and_ppo_its_old_name(tmp_path):
    assert load_recipe(TINY, ["rl.kl_coef=0.3"]).ppo.kl_coef == 0.3
    recipe = tmp_path / "r.yaml"
    recipe.write_text("rl:\n  algorithm: rloo\n  total_steps: 7\n")
    cfg = load_recipe(recipe, ["ppo.total_steps=9"])
    assert (cfg.ppo.algorithm, cfg.ppo.total_steps) == ("rloo", 9)
    recipe.write_text("rl:\n  total_steps: 7\nppo:\n  total_steps: 8\n")
    with pytest.raises(ConfigError, match="rl and ppo are the same section"):
        load_recipe(recipe)


def test_docs_config_md_is_the_generated_reference():
    doc = ROOT / "docs" / "config.md"
    assert doc.read_text() == reference(), "stale: run lowrank-rlhf config --out docs/config.md"


def test_the_reference_lists_every_key_with_its_help():
    text = reference()
    for key in ("ppo.kl_horizon", "ppo.max_nan_skips", "memory.gradient_checkpointing", "data.eval_prompts", "seed"):
        row = next((line for line in text.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, key
        assert row.rstrip("|").split("|")[-1].strip(), f"{key} has no help"
    assert "| `memory.gradient_checkpointing` | str | `auto` | auto \\| on \\| off |" in text


def test_config_out_never_replaces_a_file_it_did_not_write(tmp_path, capsys):
    mine = tmp_path / "notes.md"
    mine.write_text("my own notes\n")
    assert main(["config", "--out", str(mine)]) == 2
    assert "was not written by this command" in capsys.readouterr().err
    assert mine.read_text() == "my own notes\n"
    ours = tmp_path / "config.md"
    assert main(["config", "--out", str(ours)]) == 0 and main(["config", "--out", str(ours)]) == 0
    assert ours.read_text().startswith(MARKER)


def test_stage_rl_is_the_online_rl_stage():
    from lowrank_rlhf.pipeline import stages_for

    cfg = load_recipe(TINY)
    assert stages_for(cfg, "rl") == stages_for(cfg, "ppo") == ["ppo"]
    with pytest.raises(ConfigError, match="allowed values: sft, reward, .*rl, all"):
        stages_for(cfg, "grpo")
