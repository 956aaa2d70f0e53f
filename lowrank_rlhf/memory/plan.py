"""From a recipe to a memory plan: the model's shape, the budget, and the micro-batch sizes the PPO loop uses.

The plan needs only the model's config (no weights), so `lowrank-rlhf plan` runs anywhere, also offline for the
published LLaMA shapes.
"""

from __future__ import annotations

import logging
import os

import torch

from ..config import ConfigError, RecipeConfig
from .estimate import LLAMA2_13B, LLAMA2_7B, MemoryPlan, ModelShape, parse_bytes, plan
from ..models.loading import compute_dtype, resolve_model_path

log = logging.getLogger(__name__)

# Published shapes, so recipes for gated hub models plan without a download. LLaMA-1 7B/13B share LLaMA-2's.
KNOWN_SHAPES = {
    "meta-llama/Llama-2-7b-hf": LLAMA2_7B, "meta-llama/Llama-2-7b-chat-hf": LLAMA2_7B,
    "huggyllama/llama-7b": LLAMA2_7B, "llama2-7b": LLAMA2_7B,
    "meta-llama/Llama-2-13b-hf": LLAMA2_13B, "meta-llama/Llama-2-13b-chat-hf": LLAMA2_13B,
    "huggyllama/llama-13b": LLAMA2_13B, "llama2-13b": LLAMA2_13B,
}


def model_shape(name: str, trust_remote_code: bool = False) -> ModelShape:
    """The shape of a model from its config alone; published LLaMA shapes need no config at all."""
    if name in KNOWN_SHAPES:
        return KNOWN_SHAPES[name]
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(name), trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ConfigError(f"model.name: cannot read the config of {name!r} ({str(err).splitlines()[0]}); known "
                          f"offline shapes: {', '.join(sorted(KNOWN_SHAPES))}") from None
    return ModelShape.from_hf_config(config)


def available_bytes(device: torch.device) -> int:
    """Free memory now: the CUDA device's, or the machine's available RAM on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device.index if device.index is not None else None)
        return int(free)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 << 30


def resolve_budget(budget: str, device: torch.device) -> int:
    if budget == "auto":
        return available_bytes(device)
    try:
        return parse_bytes(budget)
    except ValueError as err:
        raise ConfigError(f"memory.budget: {err}") from None


def enforce_budget(budget: int, device: torch.device) -> None:
    """Make an 80 GB card behave like a 24 GB one: the caching allocator refuses to grow past the budget."""
    if device.type != "cuda":
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), index)


def plan_recipe(cfg: RecipeConfig, budget: str | int | None = None, shape: ModelShape | None = None) -> MemoryPlan:
    """The per-phase plan for a recipe's PPO stage (the most demanding stage) under its budget."""
    shape = shape or model_shape(cfg.model.name, cfg.model.trust_remote_code)
    here = torch.device("cuda" if torch.cuda.is_available() and cfg.model.device != "cpu" else "cpu")
    budget_bytes = budget if isinstance(budget, int) else resolve_budget(budget or cfg.memory.budget, here)
    # A recipe not pinned to the CPU is planned for the GPU it targets (bf16), even when planned on a laptop.
    target = torch.device("cpu") if cfg.model.device == "cpu" else torch.device("cuda")
    dtype_bytes = torch.finfo(compute_dtype(cfg.model.dtype, target)).bits // 8
    n_trainable = 2 if cfg.lora.critic == "separate" else 1
    targets = "all-linear" if list(cfg.lora.target_modules) == ["all-linear"] else list(cfg.lora.target_modules)
    return plan(shape, cfg.model.quantization, cfg.lora.r, targets, n_trainable,
                prompt_len=cfg.data.max_prompt_length, response_len=cfg.ppo.response_length,
                rollout_batch=cfg.ppo.rollout_batch_size, budget_bytes=budget_bytes, dtype_bytes=dtype_bytes,
                train_batch=cfg.ppo.rollout_batch_size // cfg.ppo.num_mini_batches,
                static_cache=cfg.ppo.decode != "generate")


def micro_batches(cfg: RecipeConfig, memory_plan: MemoryPlan | None) -> dict[str, int]:
    """The planner's micro-batches, with any fixed `memory.micro_batch` entries taking precedence."""
    chosen = dict(memory_plan.micro_batches) if memory_plan else {}
    unknown = set(cfg.memory.micro_batch) - {"generate", "score", "train"}
    if unknown:
        raise ConfigError(f"memory.micro_batch: unknown phase {sorted(unknown)[0]!r}; allowed: generate, score, "
                          f"train")
    chosen.update({k: int(v) for k, v in cfg.memory.micro_batch.items()})
    return chosen


def gradient_checkpointing(cfg: RecipeConfig, memory_plan: MemoryPlan | None) -> bool:
    if cfg.memory.gradient_checkpointing != "auto":
        return cfg.memory.gradient_checkpointing == "on"
    return bool(memory_plan and memory_plan.gradient_checkpointing)
