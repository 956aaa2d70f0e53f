"""The four-model PPO layout that TRL's PPOTrainer uses with PEFT, as a baseline for the benchmark.

    policy    : a quantized base + a LoRA adapter (trained)
    reference : the same base with the adapter disabled
    value     : its own quantized base + a LoRA adapter + a value head (trained)
    reward    : its own quantized base + a LoRA adapter + a reward head (frozen)

Three bases instead of our one. `FourModelRoles` is built from three `RoleModel`s, each holding one role, and routes
every role to its own model, so PPOTrainer drives both layouts through exactly the same code (forwards, dtypes,
micro-batching, OOM recovery): only the memory layout differs, which is what the benchmark compares.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..config import LoraConfig, RecipeConfig
from ..memory.estimate import (BUDGET_FRACTION, AdapterSpec, MemoryBudgetError, MemoryPlan, ModelShape, estimate_generate,
                     estimate_score, estimate_train, format_bytes, plan, weight_bytes)
from ..models.loading import compute_dtype
from ..models.roles import REFERENCE, RoleModel
from ..models.run_metadata import META_FILE

# Bases beyond the policy's: the value model and the reward model.
EXTRA_BASES = 2


class FourModelRoles(nn.Module):
    """Policy (reference = its disabled adapter), value and reward models on three separate bases, behind the
    interface PPOTrainer uses from RoleModel. Resuming from a checkpoint is not supported (a benchmark baseline)."""

    def __init__(self, policy: RoleModel, value: RoleModel, reward: RoleModel):
        super().__init__()
        for role, model in (("policy", policy), ("value", value), ("reward", reward)):
            if model.roles != (role,):
                raise ValueError(f"the {role} model must hold exactly the {role!r} role, got {model.roles}")
        self.policy_model, self.value_model, self.reward_model = policy, value, reward
        self.tokenizer = policy.tokenizer
        self.lora = policy.lora
        self.critic = "separate"
        self.roles = ("policy", "value", "reward")
        self.trainable_roles = ("policy", "value")
        self.base_name, self.quantization = policy.base_name, policy.quantization
        # the same head modules, reachable as on RoleModel (they stay registered on their own model too)
        self.heads = nn.ModuleDict({"value": value.heads["value"], "reward": reward.heads["reward"]})

    @classmethod
    def build(cls, load_base: Callable[[int], tuple[nn.Module, object]], lora: LoraConfig, base_name: str = "",
              quantization: str = "none", seed: int = 0) -> "FourModelRoles":
        """Load three bases with `load_base(i)` -> (model, tokenizer), i = 0 (policy), 1 (value), 2 (reward)."""
        if lora.critic != "separate":
            raise ValueError("the four-model layout has a separate value model: it needs lora.critic=separate")
        models = {}
        for i, role in enumerate(("policy", "value", "reward")):
            base, tokenizer = load_base(i)
            trainable = (role,) if role in ("policy", "value") else ()
            models[role] = RoleModel(base, tokenizer, lora, roles=(role,), trainable=trainable, base_name=base_name,
                                     quantization=quantization, seed=seed)
        return cls(**models)

    @property
    def models(self) -> dict[str, RoleModel]:
        return {"policy": self.policy_model, "value": self.value_model, "reward": self.reward_model}

    def _owner(self, role: str) -> RoleModel:
        if role in ("policy", REFERENCE):
            return self.policy_model
        if role in ("value", "reward"):
            return self.models[role]
        raise ValueError(f"role {role!r} is not loaded; loaded roles: policy, value, reward, {REFERENCE}")

    # ---- what PPOTrainer and the benchmark use ---------------------------------------------------------------
    def adapter_for(self, role: str) -> str | None:
        return self._owner(role).adapter_for(role)  # the reference: None (the policy base, adapter disabled)

    def activate(self, role: str) -> None:
        self._owner(role).activate(role)

    @property
    def causal_lm(self) -> nn.Module:
        return self.policy_model.causal_lm

    @property
    def device(self) -> torch.device:
        return self.policy_model.device

    def hidden_states(self, role, input_ids, attention_mask):
        return self._owner(role).hidden_states(role, input_ids, attention_mask)

    def response_logprobs(self, role, input_ids, attention_mask, response_start, temperature=1.0,
                          with_values=False, with_logits=False) -> dict:
        if with_values:
            raise ValueError("the four-model layout has a separate value model; use token_values")
        return self._owner(role).response_logprobs(role, input_ids, attention_mask, response_start, temperature,
                                                   with_logits=with_logits)

    def token_values(self, input_ids, attention_mask, response_start):
        return self.value_model.token_values(input_ids, attention_mask, response_start)

    def sequence_rewards(self, input_ids, attention_mask):
        return self.reward_model.sequence_rewards(input_ids, attention_mask)

    def logprobs(self, role, input_ids, attention_mask, response_start, temperature=1.0, micro_batch=None,
                 runner=None):
        return self._owner(role).logprobs(role, input_ids, attention_mask, response_start, temperature,
                                          micro_batch, runner)

    def values(self, input_ids, attention_mask, response_start, micro_batch=None, runner=None):
        return self.value_model.values(input_ids, attention_mask, response_start, micro_batch, runner)

    def rewards(self, input_ids, attention_mask, micro_batch=None, runner=None):
        return self.reward_model.rewards(input_ids, attention_mask, micro_batch, runner)

    @contextmanager
    def generation_mode(self):
        with self.policy_model.generation_mode():
            yield

    def generate(self, role, input_ids, attention_mask, **kwargs):
        return self._owner(role).generate(role, input_ids, attention_mask, **kwargs)

    def set_gradient_checkpointing(self, on: bool) -> None:
        for model in self.models.values():
            model.set_gradient_checkpointing(on)

    def role_parameters(self, role: str) -> list[nn.Parameter]:
        return self._owner(role).role_parameters(role)

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def metadata(self) -> dict:
        meta = self.policy_model.metadata()
        meta.update(roles=list(self.roles), heads=list(self.heads), critic=self.critic, layout="four-model")
        return meta

    def save(self, run_dir: str | Path, roles=None) -> None:
        """Each role in RUN/<role> in plain PEFT format (heads beside them), as RoleModel.save writes them: adapters
        trained in this layout load onto one shared base with RoleModel.load."""
        run_dir = Path(run_dir)
        for role in roles or self.roles:
            self.models[role].save(run_dir, roles=[role])
        (run_dir / META_FILE).write_text(json.dumps(self.metadata(), indent=2))


# ------------------------------------------------------------------------------------------------- memory planning
def dtype_bytes_for(cfg: RecipeConfig) -> int:
    """The compute dtype's size the planner assumes for a recipe (as planning.plan_recipe does)."""
    target = torch.device("cpu") if cfg.model.device == "cpu" else torch.device("cuda")
    return torch.finfo(compute_dtype(cfg.model.dtype, target)).bits // 8


def adapter_spec(cfg: RecipeConfig, layout: str) -> AdapterSpec:
    """The adapters each layout holds. ours: policy, value (trained), sft, reward (frozen), as plan_recipe assumes;
    four-model: policy, value (trained), reward (frozen) on three bases."""
    targets = "all-linear" if list(cfg.lora.target_modules) == ["all-linear"] else tuple(cfg.lora.target_modules)
    n_trainable = 2 if cfg.lora.critic == "separate" else 1
    n_frozen = 1 if layout == "four-model" else 2
    return AdapterSpec(r=cfg.lora.r, targets=targets, n_trainable=n_trainable, n_frozen=n_frozen)


def extra_base_bytes(shape: ModelShape, cfg: RecipeConfig, layout: str) -> int:
    if layout != "four-model":
        return 0
    return EXTRA_BASES * weight_bytes(shape, cfg.model.quantization, dtype_bytes_for(cfg))


def plan_four_model(cfg: RecipeConfig, budget_bytes: int, shape: ModelShape) -> MemoryPlan:
    """The planner's micro-batches for the four-model layout under the same budget as ours.

    The two extra bases are a constant in every phase, so planning with the budget lowered by
    extra / BUDGET_FRACTION is exactly planning the four-model layout under the full budget."""
    extra = extra_base_bytes(shape, cfg, "four-model")
    lora = adapter_spec(cfg, "four-model")
    reduced = budget_bytes - math.ceil(extra / BUDGET_FRACTION)
    floor = extra + lora.param_bytes(shape) + lora.optimizer_bytes(shape) + weight_bytes(
        shape, cfg.model.quantization, dtype_bytes_for(cfg))
    if reduced <= 0:
        raise MemoryBudgetError(f"memory budget {format_bytes(budget_bytes)} cannot hold the four-model "
                                f"layout's static floor {format_bytes(floor)} (3 bases + adapters + optimizer)")
    try:
        result = plan(shape, cfg.model.quantization, lora.r, lora.targets, lora.n_trainable,
                      prompt_len=cfg.data.max_prompt_length, response_len=cfg.ppo.response_length,
                      rollout_batch=cfg.ppo.rollout_batch_size, budget_bytes=reduced,
                      dtype_bytes=dtype_bytes_for(cfg), n_frozen_adapters=lora.n_frozen,
                      train_batch=cfg.ppo.rollout_batch_size // cfg.ppo.num_mini_batches,
                      static_cache=cfg.ppo.decode != "generate")
    except MemoryBudgetError:
        raise MemoryBudgetError(f"memory budget {format_bytes(budget_bytes)} cannot hold the four-model "
                                f"layout's static floor {format_bytes(floor)} (3 bases + adapters + "
                                f"optimizer)") from None
    for phase in result.phases.values():
        phase.peak_bytes += extra
        phase.components = {**phase.components, "other_bases": extra, "total": phase.peak_bytes}
    result.floor_bytes += extra
    result.budget_bytes = budget_bytes
    result.usable_bytes = int(budget_bytes * BUDGET_FRACTION)
    return result


def predicted_peaks(cfg: RecipeConfig, shape: ModelShape, layout: str, micro_batches: dict[str, int],
                    gradient_checkpointing: bool, before_first_update: bool = False) -> dict[str, int]:
    """The planner's estimate of each phase's peak at the micro-batches actually used, for either layout.

    `before_first_update`: the measured generate and score phases ran before any optimizer step (a run without
    warm-up), when no gradients or AdamW states exist yet; the planner counts them (they are there from step 2 on).
    """
    lora, q, dtype_bytes = adapter_spec(cfg, layout), cfg.model.quantization, dtype_bytes_for(cfg)
    prompt, response = cfg.data.max_prompt_length, cfg.ppo.response_length
    extra = extra_base_bytes(shape, cfg, layout)
    not_yet = lora.optimizer_bytes(shape) if before_first_update else 0
    return {
        "generate": estimate_generate(shape, q, lora, micro_batches["generate"], prompt, response, dtype_bytes,
                                      static_cache=cfg.ppo.decode != "generate")["total"] + extra - not_yet,
        "score": estimate_score(shape, q, lora, micro_batches["score"], prompt, response, dtype_bytes)["total"]
        + extra - not_yet,
        "train": estimate_train(shape, q, lora, micro_batches["train"], prompt, response, dtype_bytes,
                                gradient_checkpointing=gradient_checkpointing)["total"] + extra,
    }
