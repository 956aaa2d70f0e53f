"""The memory levers a recipe can pull, what each one saves in a plan, and which would make a plan fit.

A lever is one recipe key=value that lowers the static floor (4-bit base, 8-bit optimizer states, frozen adapters in
the compute dtype, the shared critic) or a phase's peak (logits in chunks). plan.py asks this module two questions:
for a plan that fits, which levers are on and what each saves (the "reasons" `lowrank-rlhf plan` prints); for a budget
below the floor or a plan that does not fit at micro-batch 1, which levers would make it fit, and the floor or peak
they would give. Levers act on plan.py's `PlanRequest` through `dataclasses.replace`, so each answer is the planner's
own arithmetic (the request's `floor()`, `estimate()` and a new plan) on the changed request, never a formula of its
own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from .estimate import ADAPTER_PARAM_BYTES, quantization_kind
from .sizes import format_bytes

__all__ = ["FLOOR_LEVERS", "LOGITS_CHUNK_CHOICES", "Lever", "below_floor_message", "fitting_levers", "levers_on"]

# Chunk sizes the advice tries for ppo.logits_chunk_tokens, largest first: the largest that fits is named.
LOGITS_CHUNK_CHOICES = (4096, 2048, 1024, 512, 256, 128)


@dataclass(frozen=True)
class Lever:
    """One recipe setting: whether it is on in a request, the request with it on, and the request with it off."""

    key: str  # the recipe key=value that pulls it
    what: str  # what it lowers, in words
    off: str  # the request with it released, in words
    is_on: Callable[[Any], bool]
    applies: Callable[[Any], bool]  # off, and pulling it would change something
    pull: Callable[[Any], Any]
    release: Callable[[Any], Any]


def _lora(req, **changes):
    return replace(req, lora=replace(req.lora, **changes))


FLOOR_LEVERS = (
    Lever("model.quantization=4bit", "base weights", "in 8-bit",
          is_on=lambda r: quantization_kind(r.quantization) == "4bit",
          applies=lambda r: quantization_kind(r.quantization) != "4bit",
          pull=lambda r: replace(r, quantization="4bit"),
          release=lambda r: replace(r, quantization="8bit")),
    Lever("ppo.optim=adamw_8bit", "optimizer states", "with adamw",
          is_on=lambda r: r.lora.optim != "adamw",
          applies=lambda r: r.lora.optim == "adamw" and r.lora.n_trainable + r.lora.n_trainable_heads > 0,
          pull=lambda r: _lora(r, optim="adamw_8bit"),
          release=lambda r: _lora(r, optim="adamw")),
    Lever("lora.frozen_dtype=compute", "frozen adapters", "in float32",
          is_on=lambda r: r.lora.frozen_param_bytes < ADAPTER_PARAM_BYTES,
          applies=lambda r: r.lora.frozen_param_bytes > r.dtype_bytes and r.lora.n_frozen + r.lora.n_frozen_heads > 0,
          pull=lambda r: _lora(r, frozen_param_bytes=r.dtype_bytes),
          release=lambda r: _lora(r, frozen_param_bytes=ADAPTER_PARAM_BYTES)),
    # a critic (value head trained) on its own adapter -> the value head on the policy's adapter
    Lever("lora.critic=shared", "value adapter", "with a separate critic",
          is_on=lambda r: r.lora.n_trainable_heads == 1 and r.lora.n_trainable == 1,
          applies=lambda r: r.lora.n_trainable_heads == 1 and r.lora.n_trainable == 2,
          pull=lambda r: _lora(r, n_trainable=1),
          release=lambda r: _lora(r, n_trainable=2)),
)


def _logits_lever(chunk: int) -> Lever:
    return Lever(f"ppo.logits_chunk_tokens={chunk}", "logits", "unchunked",
                 is_on=lambda r: r.logits_chunk_tokens > 0,
                 applies=lambda r: r.logits_chunk_tokens == 0 or r.logits_chunk_tokens > chunk,
                 pull=lambda r: replace(r, logits_chunk_tokens=chunk),
                 release=lambda r: replace(r, logits_chunk_tokens=0))


def _gib(n: int) -> str:
    return format_bytes(n, "GiB" if n >= 1024**3 else None)


def below_floor_message(req, budget: int, floor: int) -> str:
    """One line: the budget, the floor, and the floor each unused lever (then all of them) would give."""
    weights = "weights" if req.bases == 1 else f"{req.bases} bases"
    head = (f"memory budget {_gib(budget)} is below the static floor {_gib(floor)} ({weights} + adapters + "
            f"optimizer)")
    unused = [lever for lever in FLOOR_LEVERS if lever.applies(req)]
    if not unused:
        return f"{head}; use a smaller LoRA rank or fewer targets, or a larger budget"
    options = []
    for lever in unused:
        lowered = lever.pull(req).floor()
        options.append(f"{lever.key} -> floor {_gib(lowered)}{' (under the budget)' if lowered <= budget else ''}")
    if len(unused) > 1:
        everything = req
        for lever in unused:
            everything = lever.pull(everything)
        lowered = everything.floor()
        options.append(f"all of these -> floor {_gib(lowered)}{' (under the budget)' if lowered <= budget else ''}")
    return f"{head}; levers: {', '.join(options)}; else a smaller LoRA rank or fewer targets, or a larger budget"


def levers_on(req, memory_plan) -> list[str]:
    """What each lever that is on saves in this plan: the floor without it, or (logits) each phase's peak without
    chunking at the same micro-batch."""
    reasons = []
    for lever in FLOOR_LEVERS:
        if lever.is_on(req):
            setting = lever.key if lever.key != "ppo.optim=adamw_8bit" else f"ppo.optim={req.lora.optim}"
            reasons.append(f"{setting}: floor {_gib(memory_plan.floor_bytes)}, "
                           f"{_gib(lever.release(req).floor())} {lever.off}")
    if req.logits_chunk_tokens > 0:
        unchunked = replace(req, logits_chunk_tokens=0)
        peaks = []
        for phase in ("score", "train"):
            chosen = memory_plan.phases[phase]
            whole = unchunked.estimate(phase, chosen.micro_batch, memory_plan.gradient_checkpointing)["total"]
            if whole != chosen.peak_bytes:
                peaks.append(f"{phase} {_gib(chosen.peak_bytes)}, {_gib(whole)} unchunked")
        reasons.append(f"ppo.logits_chunk_tokens={req.logits_chunk_tokens}: "
                       f"{'; '.join(peaks) if peaks else 'no phase peak changes at these micro-batches'}")
    return reasons


def fitting_levers(req, plan_fn: Callable[[Any], Any]) -> list[str]:
    """For a plan that does not fit at micro-batch 1: each unused lever alone that makes it fit (logits: the largest
    chunk that does), else all of them together, each with the peak it gives; empty when none helps."""
    candidates = [lever for lever in FLOOR_LEVERS if lever.applies(req)]
    chunks = [_logits_lever(k) for k in LOGITS_CHUNK_CHOICES]
    hints, best_chunk = [], None
    for lever in candidates + chunks:
        if not lever.applies(req) or (lever.what == "logits" and best_chunk is not None):
            continue
        try:
            alt = plan_fn(lever.pull(req))
        except ValueError:  # still below the floor
            continue
        if alt.fits:
            hints.append(f"{lever.key} fits (largest peak {_gib(_peak(alt))})")
            best_chunk = best_chunk or (lever if lever.what == "logits" else None)
    if hints:
        return hints
    everything = req
    for lever in candidates + [chunks[-1]]:
        everything = lever.pull(everything) if lever.applies(everything) else everything
    if everything == req:
        return []
    try:
        alt = plan_fn(everything)
    except ValueError:
        return []
    if not alt.fits:
        return []
    keys = [lever.key for lever in candidates + [chunks[-1]] if lever.applies(req)]
    return [f"{' + '.join(keys)} together fit (largest peak {_gib(_peak(alt))})"]


def _peak(memory_plan) -> int:
    return max(p.peak_bytes for p in memory_plan.phases.values())
