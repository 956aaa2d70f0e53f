"""The plan: the largest micro-batch per phase that keeps every phase of a PPO step under the memory budget.

`plan` works from a model's shape alone (estimate.py); `plan_recipe` reads the shape, budget and sizes from a recipe,
so `lowrank-rlhf plan` runs anywhere, also offline for the published LLaMA shapes. The benchmark plans its four-model
baseline through the same `plan_recipe` (`bases=3`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..config import ConfigError, RecipeConfig, check_algorithm, has_critic
from ..models.loading import compute_dtype, resolve_model_path
from ..models.shapes import KNOWN_SHAPES, ModelShape, lora_targets, resolve_targets
from . import PHASES
from .estimate import ADAPTER_PARAM_BYTES, AdapterSpec, estimate_generate, estimate_score, estimate_train, static_floor
from .levers import below_floor_message, fitting_levers, levers_on
from .sizes import format_bytes, parse_bytes

log = logging.getLogger(__name__)

# The planner fills at most this fraction of the budget: the caching allocator fragments
# (blocks rounded to 512 B / 2 MiB segments, freed blocks that do not fit the next request),
# and our estimates ignore small tensors (masks, position ids, rotary tables).
BUDGET_FRACTION = 0.9


class MemoryBudgetError(ValueError):
    """The budget cannot hold what every phase needs (weights + adapters + optimizer)."""


@dataclass
class PhasePlan:
    """The micro-batch chosen for one phase and its estimated peak."""

    phase: str
    micro_batch: int
    peak_bytes: int
    fits: bool
    components: dict[str, int] = field(default_factory=dict)


@dataclass
class MemoryPlan:
    """Micro-batch sizes per phase that keep every phase under ``BUDGET_FRACTION * budget``."""

    phases: dict[str, PhasePlan]
    gradient_checkpointing: bool
    floor_bytes: int
    budget_bytes: int
    usable_bytes: int
    levers: list[str] = field(default_factory=list)  # the levers that are on and what each saves
    hints: list[str] = field(default_factory=list)  # for a plan that does not fit: levers that would make it fit

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.phases.values())

    @property
    def micro_batches(self) -> dict[str, int]:
        return {name: p.micro_batch for name, p in self.phases.items()}

    def micro_batch(self, phase: str) -> int:
        return self.phases[phase].micro_batch

    def peak_bytes(self, phase: str) -> int:
        return self.phases[phase].peak_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "fits": self.fits,
            "gradient_checkpointing": self.gradient_checkpointing,
            "floor_bytes": self.floor_bytes,
            "budget_bytes": self.budget_bytes,
            "usable_bytes": self.usable_bytes,
            "phases": {name: asdict(p) for name, p in self.phases.items()},
            "levers": self.levers,
            "hints": self.hints,
        }

    def table(self) -> str:
        rows = [("phase", "micro-batch", "est. peak", "budget", "fits")]
        for name, p in self.phases.items():
            label = f"{name} (ckpt)" if name == "train" and self.gradient_checkpointing else name
            rows.append((label, str(p.micro_batch), format_bytes(p.peak_bytes, "GiB"),
                         format_bytes(self.usable_bytes, "GiB"), "yes" if p.fits else "NO"))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        lines.append(f"floor {format_bytes(self.floor_bytes, 'GiB')} (weights + adapters + optimizer); "
                     f"budget {format_bytes(self.budget_bytes, 'GiB')} x {BUDGET_FRACTION}")
        lines += [f"lever {reason}" for reason in self.levers]
        if not self.fits:
            lines.append("would fit with: " + ("; ".join(self.hints) if self.hints else "no lever alone or together"))
        return "\n".join(lines)


def _powers_of_two_down(n: int) -> list[int]:
    top = 1 << (max(1, n).bit_length() - 1)
    return [top >> k for k in range(top.bit_length())]


def _largest_fitting(estimate: Callable[[int], dict[str, int]], max_batch: int, usable: int) -> PhasePlan | None:
    for mb in _powers_of_two_down(max_batch):
        parts = estimate(mb)
        if parts["total"] <= usable:
            return PhasePlan("", mb, parts["total"], True, parts)
    return None


@dataclass(frozen=True)
class PlanRequest:
    """Everything a plan depends on; levers.py changes one field at a time to ask what a lever would give."""

    shape: ModelShape
    quantization: str | None
    lora: AdapterSpec
    prompt_len: int
    response_len: int
    rollout_batch: int
    train_batch: int
    budget: int
    dtype_bytes: int = 2
    flash_attention: bool = True
    static_cache: bool = False
    bases: int = 1
    logits_chunk_tokens: int = 0

    def floor(self) -> int:
        return static_floor(self.shape, self.quantization, self.lora, self.dtype_bytes, self.bases)["total"]

    def estimate(self, phase: str, micro_batch: int, gradient_checkpointing: bool = True) -> dict[str, int]:
        common = dict(dtype_bytes=self.dtype_bytes, flash_attention=self.flash_attention, bases=self.bases)
        args = (self.shape, self.quantization, self.lora, micro_batch, self.prompt_len, self.response_len)
        if phase == "generate":
            return estimate_generate(*args, static_cache=self.static_cache, **common)
        chunk = dict(logits_chunk_tokens=self.logits_chunk_tokens)
        if phase == "score":
            return estimate_score(*args, **common, **chunk)
        return estimate_train(*args, gradient_checkpointing=gradient_checkpointing, **common, **chunk)


def plan(shape: ModelShape, quantization: str | None, lora_r: int, lora_targets: str | Sequence[str],
         n_trainable_adapters: int, prompt_len: int, response_len: int, rollout_batch: int,
         budget_bytes: int | str, dtype_bytes: int = 2, *, n_frozen_adapters: int = 2,
         train_batch: int | None = None, flash_attention: bool = True, static_cache: bool = False,
         bases: int = 1, n_trainable_heads: int = 1, optim: str = "adamw",
         frozen_param_bytes: int = ADAPTER_PARAM_BYTES, logits_chunk_tokens: int = 0) -> MemoryPlan:
    """Largest power-of-two micro-batch per phase that fits ``BUDGET_FRACTION * budget``.

    ``train_batch`` (the PPO minibatch; default ``rollout_batch``) caps the train micro-batch.
    Gradient checkpointing stays off if training fits at micro-batch >= min(4, train_batch)
    without it. A phase that does not fit even at micro-batch 1 is planned at 1 with
    ``fits=False`` (and `hints` name the levers that would make it fit). Raises ``MemoryBudgetError`` when the budget
    is below the static floor, naming the floor each unused lever would give. ``bases``: copies of
    the base weights on the device (3 for the four-model layout the benchmark compares against).
    ``n_trainable_heads``: 1 = the value head, 0 for the critic-free algorithms. The levers: ``optim`` (adamw |
    adamw_8bit | paged_adamw_8bit), ``frozen_param_bytes`` (4 = frozen adapters in fp32, or the compute dtype's
    bytes), ``logits_chunk_tokens`` (0 = the whole micro-batch's logits at once).
    """
    if rollout_batch < 1 or prompt_len < 0 or response_len < 1:
        raise ValueError("rollout_batch and response_len must be >= 1 and prompt_len >= 0")
    lora = AdapterSpec(r=lora_r, targets=tuple(resolve_targets(lora_targets)), n_trainable=n_trainable_adapters,
                       n_frozen=n_frozen_adapters, n_trainable_heads=n_trainable_heads, optim=optim,
                       frozen_param_bytes=frozen_param_bytes)
    request = PlanRequest(shape, quantization, lora, prompt_len, response_len, rollout_batch,
                          rollout_batch if train_batch is None else train_batch, parse_bytes(budget_bytes),
                          dtype_bytes, flash_attention, static_cache, bases, logits_chunk_tokens)
    return plan_request(request)


def plan_request(req: PlanRequest, explain: bool = True) -> MemoryPlan:
    """The plan of a request; ``explain`` adds what the levers that are on save and, for a plan that does not fit,
    which levers would make it fit (levers.py re-plans changed requests with ``explain=False``)."""
    floor = req.floor()
    if req.budget < floor:
        raise MemoryBudgetError(below_floor_message(req, req.budget, floor))
    usable = int(req.budget * BUDGET_FRACTION)

    def phase(name: str, estimate: Callable[[int], dict[str, int]], max_batch: int) -> PhasePlan:
        found = _largest_fitting(estimate, max_batch, usable)
        if found is None:
            parts = estimate(1)
            found = PhasePlan(name, 1, parts["total"], False, parts)
        found.phase = name
        return found

    phases = {name: phase(name, lambda mb, name=name: req.estimate(name, mb), req.rollout_batch)
              for name in ("generate", "score")}
    train = phase("train", lambda mb: req.estimate("train", mb, False), req.train_batch)
    checkpointing = not (train.fits and train.micro_batch >= min(4, req.train_batch))
    if checkpointing:
        train = phase("train", lambda mb: req.estimate("train", mb, True), req.train_batch)
    phases["train"] = train
    memory_plan = MemoryPlan(phases, checkpointing, floor, req.budget, usable)
    if explain:
        memory_plan.levers = levers_on(req, memory_plan)
        if not memory_plan.fits:
            memory_plan.hints = fitting_levers(req, lambda changed: plan_request(changed, explain=False))
    return memory_plan


# --------------------------------------------------------------------------- a recipe's plan


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


def recipe_dtype_bytes(cfg: RecipeConfig) -> int:
    """The compute dtype's size. A recipe not pinned to the CPU is planned for the GPU it targets (bf16), even when
    planned on a laptop."""
    target = torch.device("cpu") if cfg.model.device == "cpu" else torch.device("cuda")
    return torch.finfo(compute_dtype(cfg.model.dtype, target)).bits // 8


def recipe_adapters(cfg: RecipeConfig, frozen_adapters: int = 2) -> AdapterSpec:
    """The adapters of a recipe's PPO stage: policy and (with a separate critic) value trained; by default sft (the
    reference) and reward frozen. The critic-free algorithms (grpo, rloo, reinforce_pp) train the policy alone: no
    value adapter, no value head, no optimizer states for either. `ppo.optim` and `lora.frozen_dtype` set what a
    trained parameter's optimizer and a frozen parameter cost."""
    critic = has_critic(cfg.ppo.algorithm)
    n_trainable = 2 if critic and cfg.lora.critic == "separate" else 1
    targets = lora_targets(cfg.lora.target_modules)
    frozen_bytes = recipe_dtype_bytes(cfg) if cfg.lora.frozen_dtype == "compute" else ADAPTER_PARAM_BYTES
    return AdapterSpec(r=cfg.lora.r, targets=targets if isinstance(targets, str) else tuple(targets),
                       n_trainable=n_trainable, n_frozen=frozen_adapters, n_trainable_heads=1 if critic else 0,
                       optim=cfg.ppo.optim, frozen_param_bytes=frozen_bytes)


def plan_recipe(cfg: RecipeConfig, budget: str | int | None = None, shape: ModelShape | None = None, *,
                bases: int = 1, frozen_adapters: int = 2) -> MemoryPlan:
    """The per-phase plan for a recipe's PPO stage (the most demanding stage) under its budget.

    `bases` and `frozen_adapters` describe another layout of the same roles (the benchmark's four-model baseline:
    3 bases, only the reward adapter frozen)."""
    check_algorithm(cfg.ppo)
    shape = shape or model_shape(cfg.model.name, cfg.model.trust_remote_code)
    here = torch.device("cuda" if torch.cuda.is_available() and cfg.model.device != "cpu" else "cpu")
    budget_bytes = budget if isinstance(budget, int) else resolve_budget(budget or cfg.memory.budget, here)
    lora = recipe_adapters(cfg, frozen_adapters)
    return plan(shape, cfg.model.quantization, lora.r, lora.targets, lora.n_trainable,
                prompt_len=cfg.data.max_prompt_length, response_len=cfg.ppo.response_length,
                rollout_batch=cfg.ppo.rollout_batch_size, budget_bytes=budget_bytes,
                dtype_bytes=recipe_dtype_bytes(cfg), n_frozen_adapters=lora.n_frozen,
                train_batch=cfg.ppo.rollout_batch_size // cfg.ppo.num_mini_batches,
                static_cache=cfg.ppo.decode != "generate", bases=bases, n_trainable_heads=lora.n_trainable_heads,
                optim=lora.optim, frozen_param_bytes=lora.frozen_param_bytes,
                logits_chunk_tokens=cfg.ppo.logits_chunk_tokens)


def recipe_peaks(cfg: RecipeConfig, shape: ModelShape, micro_batches: dict[str, int], gradient_checkpointing: bool,
                 *, bases: int = 1, frozen_adapters: int = 2, before_first_update: bool = False) -> dict[str, int]:
    """The estimated peak of each phase at the micro-batches actually used (the benchmark compares them with the
    measured peaks).

    `before_first_update`: the measured generate and score phases ran before any optimizer step (a run without
    warm-up), when no gradients or AdamW states exist yet; the planner counts them (they are there from step 2 on).
    """
    lora, q, dtype_bytes = recipe_adapters(cfg, frozen_adapters), cfg.model.quantization, recipe_dtype_bytes(cfg)
    prompt, response = cfg.data.max_prompt_length, cfg.ppo.response_length
    not_yet = lora.optimizer_bytes(shape) if before_first_update else 0
    common = dict(dtype_bytes=dtype_bytes, bases=bases)
    chunk = dict(logits_chunk_tokens=cfg.ppo.logits_chunk_tokens)
    return {
        "generate": estimate_generate(shape, q, lora, micro_batches["generate"], prompt, response,
                                      static_cache=cfg.ppo.decode != "generate", **common)["total"] - not_yet,
        "score": estimate_score(shape, q, lora, micro_batches["score"], prompt, response, **common, **chunk)["total"]
        - not_yet,
        "train": estimate_train(shape, q, lora, micro_batches["train"], prompt, response,
                                gradient_checkpointing=gradient_checkpointing, **common, **chunk)["total"],
    }


def micro_batches(cfg: RecipeConfig, memory_plan: MemoryPlan | None) -> dict[str, int]:
    """The planner's micro-batches, with any fixed `memory.micro_batch` entries taking precedence."""
    chosen = dict(memory_plan.micro_batches) if memory_plan else {}
    unknown = set(cfg.memory.micro_batch) - set(PHASES)
    if unknown:
        raise ConfigError(f"memory.micro_batch: unknown phase {sorted(unknown)[0]!r}; allowed: {', '.join(PHASES)}")
    chosen.update({k: int(v) for k, v in cfg.memory.micro_batch.items()})
    return chosen


def gradient_checkpointing(cfg: RecipeConfig, memory_plan: MemoryPlan | None) -> bool:
    if cfg.memory.gradient_checkpointing != "auto":
        return cfg.memory.gradient_checkpointing == "on"
    return bool(memory_plan and memory_plan.gradient_checkpointing)
