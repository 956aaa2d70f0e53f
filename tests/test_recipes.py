"""Every shipped recipe loads strictly and fits its card; a recipe that no test covers fails the suite."""

import re
from pathlib import Path

import pytest
import yaml

from lowrank_rlhf.config import load_recipe
from lowrank_rlhf.memory.plan import plan_recipe
from lowrank_rlhf.quickstart import QUICKSTART, quickstart_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
# recipe -> (model, the card's memory the recipe must plan within)
EXPECTED = {
    "tiny-cpu.yaml": ("tiny-llama", "2GiB"),
    "quickstart-smollm2.yaml": ("smollm2-135m", "4GiB"),
    "llama2-7b-rtx3090.yaml": ("meta-llama/Llama-2-7b-hf", "24GiB"),
    "llama2-13b-rtx4090.yaml": ("meta-llama/Llama-2-13b-hf", "24GiB"),
    "llama-7b-colab-t4.yaml": ("huggyllama/llama-7b", "15GiB"),
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


def test_quickstart_recipe_file_matches_the_quickstart_command(tmp_path):
    from_file = load_recipe(RECIPES / "quickstart-smollm2.yaml", [f"run_dir={tmp_path}"])
    assert from_file == quickstart_recipe(smoke=False, run_dir=tmp_path)
    assert len(QUICKSTART) > 10


def test_gpu_recipes_name_public_datasets_by_hub_id():
    for name in ("llama2-7b-rtx3090.yaml", "llama2-13b-rtx4090.yaml", "llama-7b-colab-t4.yaml"):
        data = yaml.safe_load((RECIPES / name).read_text())["data"]
        assert all("/" in data[k] and not Path(data[k]).exists() for k in ("sft", "preferences", "prompts"))
