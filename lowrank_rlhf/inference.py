"""Using a finished run: answer prompts with its policy, or export the policy (adapter alone, or merged)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .config import ConfigError, load_recipe
from .models.loading import load_base, load_tokenizer, resolve_model_path
from .models.roles import RoleModel
from .models.run_metadata import read_run_metadata


def load_run(run_dir: Path, roles=("policy", "sft")) -> RoleModel:
    """The run's base (as its recipe.yaml says) with the run's adapters, for inference."""
    read_run_metadata(run_dir)  # a clear error if this is not a run directory
    recipe = run_dir / "recipe.yaml"
    cfg = load_recipe(recipe if recipe.is_file() else None)
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


def export_run(run_dir: Path, out: Path, merge: bool = False, overwrite: bool = False) -> Path:
    """The policy adapter alone (plain PEFT), or merged into an unquantized bf16 copy of the base."""
    read_run_metadata(run_dir)
    source = run_dir / "policy" if (run_dir / "policy").is_dir() else run_dir / "sft"
    if not (source / "adapter_config.json").is_file():
        raise ConfigError(f"{run_dir}: no policy (or sft) adapter to export")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out}: output directory exists and is not empty; pass --overwrite or choose another")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if merge:
        import peft
        from transformers import AutoModelForCausalLM

        recipe = run_dir / "recipe.yaml"
        cfg = load_recipe(recipe if recipe.is_file() else None)
        path = resolve_model_path(cfg.model.name)
        # Merging into 4-bit weights is lossy; merge into a bf16 copy of the base instead.
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                    trust_remote_code=cfg.model.trust_remote_code)
        merged = peft.PeftModel.from_pretrained(base, str(source)).merge_and_unload()
        merged.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(path).save_pretrained(tmp)
    else:
        shutil.copytree(source, tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
