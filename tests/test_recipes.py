"""Every shipped recipe loads strictly and fits its card; a recipe that no test covers fails the suite."""

import re
from pathlib import Path

import pytest
import yaml

from lowrank_rlhf.commands.quickstart import RECIPE, quickstart_recipe
from lowrank_rlhf.config import load_recipe
from lowrank_rlhf.memory.plan import plan_recipe
from lowrank_rlhf.recipes import RECIPES_DIR, recipe_path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
# recipe -> (model, the card's memory the recipe must plan within)
EXPECTED = {
    "tiny-cpu.yaml": ("tiny-llama", "2GiB"),
    "quickstart-smollm2.yaml": ("smollm2-135m", "4GiB"),
    "llama2-7b-rtx3090.yaml": ("meta-llama/Llama-2-7b-hf", "24GiB"),
    "llama2-13b-rtx4090.yaml": ("meta-llama/Llama-2-13b-hf", "24GiB"),
    "llama-7b-colab-t4.yaml": ("huggyllama/llama-7b", "15GiB"),
    "text2sql-smollm2.yaml": ("smollm2-135m", "4GiB"),
    "text2sql-llama2-7b-rtx3090.yaml": ("meta-llama/Llama-2-7b-chat-hf", "24GiB"),
    # issue 16: bigger models and smaller cards through the memory levers
    "llama-33b-rtx3090.yaml": ("huggyllama/llama-30b", "24GiB"),
    "llama2-7b-6gb.yaml": ("meta-llama/Llama-2-7b-hf", "6GiB"),
    "llama2-13b-10gb.yaml": ("meta-llama/Llama-2-13b-hf", "10GiB"),
    "llama3-8b-rtx4090.yaml": ("meta-llama/Llama-3.1-8B-Instruct", "24GiB"),
    "qwen3-8b-colab-t4.yaml": ("Qwen/Qwen3-8B", "15GiB"),
    # issue 13: critic-free GRPO on the 24 GB and 16 GB cards
    "llama2-7b-grpo-rtx3090.yaml": ("meta-llama/Llama-2-7b-hf", "24GiB"),
    "llama2-7b-grpo-colab-t4.yaml": ("meta-llama/Llama-2-7b-hf", "15GiB"),
    "llama2-13b-grpo-rtx4090.yaml": ("meta-llama/Llama-2-13b-hf", "24GiB"),
    "llama2-13b-grpo-colab-t4.yaml": ("meta-llama/Llama-2-13b-hf", "15GiB"),
}
GRPO_RECIPES = sorted(name for name in EXPECTED if "-grpo-" in name)


def test_every_recipe_is_covered():
    assert {p.name for p in RECIPES.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_loads_strictly_and_plans_for_its_card(name):
    path = RECIPES / name
    header = path.read_text().splitlines()[:6]
    for word in ("What:", "Card:", "Expected peak memory:", "Command:"):
        assert any(word in line for line in header if line.startswith("#")), word
    cfg = load_recipe(path)
    model, card = EXPECTED[name]
    assert cfg.model.name == model
    memory_plan = plan_recipe(cfg, budget=card)
    assert memory_plan.fits, memory_plan.table()
    stated = re.search(r"Expected peak memory: ([\d.]+) GiB \(planner estimate at budget (\w+)", "\n".join(header))
    if stated:  # a planned figure in the header is the planner's, at the budget it names
        at_budget = plan_recipe(cfg, budget=stated.group(2))
        peak = max(p.peak_bytes for p in at_budget.phases.values()) / 1024**3
        assert abs(peak - float(stated.group(1))) < 0.05, f"{name} says {stated.group(1)} GiB, the plan {peak:.2f}"


def test_the_installed_recipes_are_the_recipes_folder():
    """pyproject.toml installs recipes/ as lowrank_rlhf.recipes: what the quickstart reads is this folder's file."""
    assert recipe_path(RECIPE).samefile(RECIPES / "quickstart-smollm2.yaml")
    assert {p.name for p in RECIPES_DIR.glob("*.yaml")} == set(EXPECTED)


def test_pyproject_lists_every_package():
    """The package list is written out (the finder cannot map recipes/); a package missing from it would be left
    out of a non-editable install while every test here still passed."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "lowrank_rlhf").rglob("__init__.py")}
    assert set(listed) == on_disk | {"lowrank_rlhf.recipes"}


def test_quickstart_smoke_only_shrinks_the_run(tmp_path):
    full, smoke = quickstart_recipe(False, tmp_path), quickstart_recipe(True, tmp_path)
    assert full.model == smoke.model and full.lora == smoke.lora
    assert smoke.ppo.total_steps < full.ppo.total_steps and smoke.data.max_samples < (full.data.max_samples or 10**9)


def test_gpu_recipes_name_public_datasets_by_hub_id():
    for name in ("llama2-7b-rtx3090.yaml", "llama2-13b-rtx4090.yaml", "llama-7b-colab-t4.yaml",
                 "llama-33b-rtx3090.yaml", "llama2-7b-6gb.yaml", "llama2-13b-10gb.yaml", "llama3-8b-rtx4090.yaml",
                 "qwen3-8b-colab-t4.yaml", *GRPO_RECIPES):
        data = yaml.safe_load((RECIPES / name).read_text())["data"]
        assert all("/" in data[k] and not Path(data[k]).exists() for k in ("sft", "preferences", "prompts"))


def test_llama_33b_plan_says_it_fits_24gib_with_the_reasons():
    """Issue 16's done-when: `lowrank-rlhf plan recipes/llama-33b-rtx3090.yaml` says it fits 24 GiB, and why: each
    lever's line gives the floor with it and without it, and without them the floor leaves no room to run."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "lowrank_rlhf", "plan", str(RECIPES / "llama-33b-rtx3090.yaml")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1] == "fits" and "budget 24.00 GiB" in out.stdout
    for lever in ("ppo.optim=adamw_8bit: floor", "lora.frozen_dtype=compute: floor", "lora.critic=shared: floor",
                  "ppo.logits_chunk_tokens=256:"):
        assert any(line.startswith(f"lever {lever}") for line in lines), lever
    cfg = load_recipe(RECIPES / "llama-33b-rtx3090.yaml")
    released = load_recipe(RECIPES / "llama-33b-rtx3090.yaml", ["ppo.optim=adamw", "lora.frozen_dtype=float32",
                                                               "lora.critic=separate", "ppo.logits_chunk_tokens=0"])
    with_levers, without = plan_recipe(cfg), plan_recipe(released)
    assert with_levers.fits and with_levers.floor_bytes < without.floor_bytes
    assert not without.fits  # the levers are what makes it fit
    assert "would fit with:" in without.table()


@pytest.mark.parametrize("name", GRPO_RECIPES)
def test_grpo_recipes_plan_no_critic_and_whole_groups(name):
    """Critic-free: one trained adapter, no value head; the rollout holds whole groups of num_generations rows."""
    from lowrank_rlhf.memory.plan import recipe_adapters

    cfg = load_recipe(RECIPES / name)
    assert (cfg.ppo.algorithm, cfg.ppo.num_generations, cfg.ppo.beta) == ("grpo", 8, 0.04)
    assert cfg.ppo.rollout_batch_size % cfg.ppo.num_generations == 0
    adapters = recipe_adapters(cfg)
    assert (adapters.n_trainable, adapters.n_trainable_heads) == (1, 0)
    ppo = plan_recipe(load_recipe(RECIPES / name, ["ppo.algorithm=ppo"]))
    assert plan_recipe(cfg).floor_bytes < ppo.floor_bytes


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_no_recipe_chooses_its_best_policy_on_a_held_out_set(name):
    """RUN/best is chosen on data.eval_prompts; the quickstart chose it on clickbait_heldout, the very set the report
    and `eval` score, so its best row was not a held-out number."""
    from lowrank_rlhf.commands.evaluation import TASKS

    held_out_sets = {table for table, _, _ in TASKS.values()}
    assert load_recipe(RECIPES / name).data.eval_prompts not in held_out_sets
