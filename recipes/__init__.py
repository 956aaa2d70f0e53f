"""The shipped recipes, one YAML per target card (each starts with a comment: what, which card, peak, command).

pyproject.toml installs this top-level folder as the package `lowrank_rlhf.recipes`, so `recipe_path` finds a
recipe in a checkout (editable install) and in an installed copy alike."""

from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent


def recipe_path(name: str) -> Path:
    """The shipped recipe `name` (e.g. "quickstart-smollm2.yaml")."""
    return RECIPES_DIR / name
