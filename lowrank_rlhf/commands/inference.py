"""Using a finished run: load its base and adapters as it trained them, and answer chat prompts with its policy."""

from __future__ import annotations

from pathlib import Path

from .. import data
from ..config import ConfigError, RecipeConfig, load_recipe
from ..data import DataError
from ..models.loading import load_base
from ..models.roles import RoleModel
from ..rl.rollout import greedy_answers
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


def context_length(model: RoleModel, max_length: int) -> int:
    """The longest prompt + answer the run's model is asked to handle: model.max_length, and never past the
    positions the model was trained on."""
    positions = getattr(model.causal_lm.config, "max_position_embeddings", None)
    return min(max_length, positions) if positions else max_length


def encode_questions(model: RoleModel, prompts: list[str], max_new_tokens: int, max_length: int,
                     truncate: bool = False) -> list[list[int]]:
    """User questions as the run's prompts are encoded (data.chat: a user turn through the chat template, or plain
    text), refused in one line when prompt + answer would run past the context, or cut from the left with
    `truncate`."""
    tok, context = model.tokenizer, context_length(model, max_length)
    room = context - max_new_tokens
    if room < 1:
        raise ConfigError(f"--max-new-tokens: {max_new_tokens} leaves no room for a prompt in the model's context of "
                          f"{context} tokens; allowed: at most {context - 1}")
    rows = [[{"role": "user", "content": p}] if tok.chat_template else p for p in prompts]
    ids = data.encode_prompts(rows, tok, context * 1000, name="--prompt")
    too_long = [len(row) for row in ids if len(row) > room]
    if too_long and not truncate:
        raise DataError(f"--prompt: {len(too_long)} of {len(ids)} prompts are longer than the {room} tokens the "
                        f"context leaves (model.max_length {context} less --max-new-tokens {max_new_tokens}; longest: "
                        f"{max(too_long)}); shorten them, or pass --truncate to keep their end")
    return data.encode_prompts(rows, tok, room, "truncate", name="--prompt") if too_long else ids


def answer(model: RoleModel, prompts: list[str], role: str = "policy", max_new_tokens: int = 64,
           max_length: int = 1024, truncate: bool = False) -> list[str]:
    """Greedy answers to user questions under `role` (policy, sft or base = adapters disabled)."""
    ids = encode_questions(model, prompts, max_new_tokens, max_length, truncate)
    return greedy_answers(model, role, ids, max_new_tokens)


def generate_from_run(run_dir: Path, prompts: list[str], role: str = "policy", max_new_tokens: int = 64,
                      truncate: bool = False):
    model = load_run(run_dir)
    return answer(model, prompts, role=role, max_new_tokens=max_new_tokens,
                  max_length=run_recipe(run_dir).model.max_length, truncate=truncate)
