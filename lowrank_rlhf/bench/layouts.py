"""The layouts the bench compares, built and planned under the same budget.

    ours          one quantized base; policy, value (trained), sft = reference, reward (frozen) as LoRA adapters
    four-model    TRL's layout: policy base + LoRA (reference = adapter disabled), a separate quantized value model
                  and a separate quantized reward model (four_model.py)
    ours-matched  ours at the micro-batches the four-model layout ran with (its plan's, if it has not run before):
                  the same work, so peaks differ only by the layout
"""

from __future__ import annotations

from ..memory.plan import BUDGET_FRACTION, MemoryBudgetError, MemoryPlan, plan_recipe
from ..memory.sizes import format_bytes
from ..models.random_llama import model_weight_bytes
from ..models.roles import RoleModel
from .four_model import FourModelRoles
from .workload import Workload


class DoesNotFit(MemoryBudgetError):
    """The planner says a layout cannot run in the budget, even at micro-batch 1 (run it anyway with --force)."""


def model_layout(layout: str) -> str:
    """The models a layout builds: ours-matched is ours at other micro-batches."""
    return "four-model" if layout == "four-model" else "ours"


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
    model = RoleModel(base, tok, cfg.lora, roles=("policy", "value", "reward", "sft"), trainable=("policy", "value"),
                      **common)
    return model, size, size


def layout_plan(work: Workload, layout: str, four_model_plan: MemoryPlan | None, four_model_error: str | None
                ) -> MemoryPlan:
    """The planner's plan for a layout; DoesNotFit when not even micro-batch 1 fits (unless --force or fixed
    micro-batches)."""
    if layout == "ours":
        memory_plan = plan_recipe(work.cfg, work.budget_bytes, shape=work.shape)
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
