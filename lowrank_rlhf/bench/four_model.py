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
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..config import LoraConfig, RecipeConfig
from ..memory.plan import MemoryBudgetError, MemoryPlan, plan_recipe, recipe_peaks
from ..models.roles import REFERENCE, RoleModel
from ..models.shapes import ModelShape
from ..run.metadata import META_FILE

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
              quantization: str = "none", seed: int = 0) -> FourModelRoles:
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
                          with_values=False, **kwargs) -> dict:
        if with_values:
            raise ValueError("the four-model layout has a separate value model; use token_values")
        # kwargs: with_logits, with_entropy, chunk_tokens (RoleModel.response_logprobs)
        return self._owner(role).response_logprobs(role, input_ids, attention_mask, response_start, temperature,
                                                   **kwargs)

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
# The four-model layout to the planner: three bases; policy and value adapters trained, the reward adapter frozen
# (the reference is the policy's disabled adapter, not a frozen sft adapter as in ours).
# Ours under a critic-free algorithm holds the policy adapter alone (reference = adapter disabled, the reward a Python
# function), as TRL's GRPOTrainer does with PEFT.
LAYOUT_PLANNING = {"ours": dict(bases=1, frozen_adapters=2),
                   "ours-policy-only": dict(bases=1, frozen_adapters=0),
                   "four-model": dict(bases=1 + EXTRA_BASES, frozen_adapters=1)}


def plan_four_model(cfg: RecipeConfig, budget_bytes: int, shape: ModelShape) -> MemoryPlan:
    """The planner's micro-batches for the four-model layout under the same budget as ours."""
    try:
        return plan_recipe(cfg, budget_bytes, shape, **LAYOUT_PLANNING["four-model"])
    except MemoryBudgetError as err:
        raise MemoryBudgetError(f"the four-model layout: {err}") from None


def predicted_peaks(cfg: RecipeConfig, shape: ModelShape, layout: str, micro_batches: dict[str, int],
                    gradient_checkpointing: bool, before_first_update: bool = False) -> dict[str, int]:
    """The planner's estimate of each phase's peak at the micro-batches actually used, for either layout."""
    return recipe_peaks(cfg, shape, micro_batches, gradient_checkpointing, before_first_update=before_first_update,
                        **LAYOUT_PLANNING[layout])
