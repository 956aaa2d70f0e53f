"""Using a finished run: load its base and adapters as it trained them, and answer chat prompts with its policy."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ConfigError, RecipeConfig, load_recipe
from ..models.loading import load_base
from ..models.roles import RoleModel
from ..run.metadata import read_run_metadata


def run_recipe(run_dir: Path) -> RecipeConfig:
    """The recipe a run was trained with (RUN/recipe.yaml), after a clear error if `run_dir` is not a run."""
    read_run_metadata(run_dir)
    recipe = run_dir / "recipe.yaml"
    return load_recipe(recipe if recipe.is_file() else None)


def load_run(run_dir: Path, roles=("policy", "sft")) -> RoleModel:
    """The run's base (as its recipe.yaml says) with the run's adapters, for inference."""
    cfg = run_recipe(run_dir)
    base, tok = load_base(cfg.model)
    present = tuple(r for r in roles if (run_dir / r / "adapter_config.json").is_file() or
                    (r == "policy" and (run_dir / "sft").is_dir()))
    if not present:
        raise ConfigError(f"{run_dir}: no policy or sft adapter to generate with")
    return RoleModel.load(base, tok, run_dir, cfg.lora, base_name=cfg.model.name,
                          quantization=cfg.model.quantization, roles=present, trainable=())


def chat_prompt(tokenizer, text: str) -> str:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text


@torch.no_grad()
def answer(model: RoleModel, prompts: list[str], role: str = "policy", max_new_tokens: int = 64) -> list[str]:
    """Greedy answers to chat prompts under `role` (policy, sft or base = adapters disabled)."""
    tok = model.tokenizer
    texts = [chat_prompt(tok, p) for p in prompts]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    out = model.generate(role, batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=tok.eos_token_id)
    return tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def generate_from_run(run_dir: Path, prompts: list[str], role: str = "policy", max_new_tokens: int = 64):
    model = load_run(run_dir)
    return answer(model, prompts, role=role, max_new_tokens=max_new_tokens)
