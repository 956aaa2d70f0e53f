"""The layouts the bench compares, built and planned under the same budget.

    ours          one quantized base; policy, value (trained), sft = reference, reward (frozen) as LoRA adapters;
                  with a critic-free --algorithm: the policy adapter alone (reference = adapter disabled, as TRL's
                  GRPOTrainer with PEFT; the score is the Python reward function)
    four-model    TRL's layout: policy base + LoRA (reference = adapter disabled), a separate quantized value model
                  and a separate quantized reward model (four_model.py)
    ours-matched  ours at the micro-batches the four-model layout ran with (its plan's, if it has not run before):
                  the same work, so peaks differ only by the layout
    trl-grpo      TRL's own GRPOTrainer on the same base, prompts and reward function (trl_grpo.py)
"""

from __future__ import annotations

import dataclasses

from ..memory.plan import BUDGET_FRACTION, MemoryBudgetError, MemoryPlan, plan_recipe
from ..memory.sizes import format_bytes
from ..models.random_llama import model_weight_bytes
from ..models.roles import RoleModel
from .four_model import LAYOUT_PLANNING, FourModelRoles
from .workload import Workload


class DoesNotFit(MemoryBudgetError):
    """The planner says a layout cannot run in the budget, even at micro-batch 1 (run it anyway with --force)."""


def model_layout(layout: str, critic: bool = True) -> str:
    """The models a layout builds (a key of four_model.LAYOUT_PLANNING): ours-matched is ours at other
    micro-batches; ours without a critic is the policy adapter alone."""
    if layout == "four-model":
        return "four-model"
    return "ours" if critic else "ours-policy-only"


def critic_free_roles(lora):
    """(roles, trainable, lora) of our layout for grpo/rloo/reinforce_pp: the policy adapter alone."""
    return ("policy",), ("policy",), dataclasses.replace(lora, critic="separate")


def build_layout(work: Workload, layout: str) -> tuple[RoleModel | FourModelRoles, int, int]:
    """(model, bytes of all its bases, bytes of the base read per decode step)."""
    cfg = work.cfg
    common = dict(base_name=work.model_name, quantization=cfg.model.quantization, seed=cfg.seed)
    if model_layout(layout) == "four-model":
        sizes = []

        def load(i):
            base, tok = work.load_base(i)
            sizes.append(model_weight_bytes(base))
            return base, tok
        model = FourModelRoles.build(load, cfg.lora, **common)
        return model, sum(sizes), sizes[0]
    base, tok = work.load_base(0)
    size = model_weight_bytes(base)
    if not work.critic:
        roles, trainable, lora = critic_free_roles(cfg.lora)
        return RoleModel(base, tok, lora, roles=roles, trainable=trainable, **common), size, size
    model = RoleModel(base, tok, cfg.lora, roles=("policy", "value", "reward", "sft"), trainable=("policy", "value"),
                      **common)
    return model, size, size


def layout_plan(work: Workload, layout: str, four_model_plan: MemoryPlan | None, four_model_error: str | None
                ) -> MemoryPlan:
    """The planner's plan for a layout; DoesNotFit when not even micro-batch 1 fits (unless --force or fixed
    micro-batches)."""
    if layout == "ours":
        memory_plan = plan_recipe(work.cfg, work.budget_bytes, shape=work.shape,
                                  **LAYOUT_PLANNING[model_layout(layout, work.critic)])
    elif four_model_plan is None:
        raise DoesNotFit(four_model_error or "the four-model layout has no plan")
    else:
        memory_plan = four_model_plan
    if not memory_plan.fits and not work.args.force and not work.micro_override:
        worst = max(memory_plan.phases.values(), key=lambda p: p.peak_bytes)
        raise DoesNotFit(f"the planner's estimate for phase {worst.phase!r} at micro-batch 1 is "
                         f"{format_bytes(worst.peak_bytes)}, above {format_bytes(memory_plan.usable_bytes)}"
                         f" ({BUDGET_FRACTION:g} x the budget); --force runs it anyway")
    return memory_plan
