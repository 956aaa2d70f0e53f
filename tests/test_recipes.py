"""Every shipped recipe loads strictly and fits its card; a recipe that no test covers fails the suite."""

import re
from pathlib import Path

import pytest
import yaml

from lowrank_rlhf.config import load_recipe
from lowrank_rlhf.memory.plan import plan_recipe
from lowrank_rlhf.quickstart import RECIPE, quickstart_recipe
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
}


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
    for name in ("llama2-7b-rtx3090.yaml", "llama2-13b-rtx4090.yaml", "llama-7b-colab-t4.yaml"):
        data = yaml.safe_load((RECIPES / name).read_text())["data"]
        assert all("/" in data[k] and not Path(data[k]).exists() for k in ("sft", "preferences", "prompts"))
