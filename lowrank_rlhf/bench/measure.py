"""Measuring one layout: build it, run warm-up and measured PPO steps, and summarise them.

Phase times and peaks are the trainer's own (`trainer.clock`, rl/timing.py): the bench only times the whole step
(device synchronised before and after) and watches the policy's forward calls during generation.
"""

from __future__ import annotations

import logging
import math
import resource
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..memory import PHASES
from ..memory.plan import MemoryPlan, gradient_checkpointing
from ..rewards import Scorer
from ..rl.trainer import PPOTrainer
from .four_model import predicted_peaks
from .layouts import build_layout, layout_plan, model_layout
from .workload import Workload

log = logging.getLogger(__name__)

# Peak memory bandwidth (bytes/s) by GPU name, first match wins (vendor data sheets).
BANDWIDTH = [
    ("GH200", 4.0e12), ("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
    ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12),
    ("L40S", 0.864e12), ("L40", 0.864e12), ("L4", 0.3e12), ("A10G", 0.6e12), ("A10", 0.6e12),
    ("RTX 4090", 1.008e12), ("RTX 3090", 0.936e12), ("RTX 6000 Ada", 0.96e12), ("T4", 0.32e12), ("V100", 0.9e12),
]

# Every key of a layout's result, so the JSON has one schema whether a layout ran, failed or did not fit.
LAYOUT_KEYS = (
    "layout", "status", "error", "plan", "build_s", "weight_bytes", "decode_weight_bytes", "allocated_at_start_bytes",
    "static_allocated_bytes", "build_peak_allocated_bytes", "compute_dtypes", "gradient_checkpointing",
    "micro_batches", "micro_batches_measured", "peak_bytes", "predicted_peak_bytes", "measured_over_predicted",
    "time_s", "step_time_s", "step_time_median_s", "peak_rss_bytes", "peak_rss_scope", "generate_tokens_per_s",
    "score_tokens_per_s", "train_tokens_per_s", "generate_passes",
    "decode_ms_per_step", "decode_ms_per_step_per_pass", "weight_read_floor_ms", "decode_over_floor", "oom_events",
    "generation", "final_kl", "final_score", "response_length", "steps")


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def empty_layout(name: str) -> dict:
    result = dict.fromkeys(LAYOUT_KEYS)
    result.update(layout=name, status="pending", compute_dtypes=[], oom_events=[], steps=[])
    return result


class GenerationProbe:
    """Watches the policy model's forward calls while the trainer's clock is in the generate phase. With the KV cache
    on, each generate pass is one prefill (empty cache) followed by decode calls that feed exactly one new token per
    row; gradient checkpointing and training mode must be off throughout (checkpointing disables the cache and makes
    decoding quadratic)."""

    def __init__(self, causal_lm, clock):
        self.clock = clock
        self.prefill_calls = self.decode_calls = self.single_token_decode_calls = 0
        self.checkpointing_seen = self.training_seen = False
        self.handle = causal_lm.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if self.clock.current != "generate":
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        if cache is None:
            cache = kwargs.get("cache")  # the name transformers 5.x generate() passes it under
        cached = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        if cached == 0:
            self.prefill_calls += 1
        else:
            self.decode_calls += 1
            self.single_token_decode_calls += int(ids is not None and ids.shape[-1] == 1)
        checkpointing = getattr(module, "is_activation_checkpointing", None)  # transformers 5 name
        if checkpointing is None:
            checkpointing = getattr(module, "is_gradient_checkpointing", False)
        self.checkpointing_seen |= bool(checkpointing)
        self.training_seen |= bool(module.training)

    def report(self) -> dict:
        return {"prefill_calls": self.prefill_calls, "decode_calls": self.decode_calls,
                "kv_cache_used": self.decode_calls > 0 and self.single_token_decode_calls == self.decode_calls,
                "gradient_checkpointing_during_generate": self.checkpointing_seen,
                "training_mode_during_generate": self.training_seen}

    def remove(self) -> None:
        self.handle.remove()


def measured_step(trainer: PPOTrainer) -> dict:
    """One train_step with its wall time (device synchronised), and the trainer's per-phase times and peaks."""
    trainer.clock.sync()
    start = time.perf_counter()
    metrics = trainer.train_step()
    trainer.clock.sync()
    return {"step_time_s": time.perf_counter() - start,
            "phases": {p: asdict(m) for p, m in trainer.clock.last.items()},
            "micro_batches": {p: r.micro_batch for p, r in trainer.runners.items()},
            "kl": metrics["objective/kl"], "score": metrics["objective/scores"],
            "response_length": metrics["val/response_length"]}


def compute_dtypes(model) -> list[str]:
    """The compute dtypes of the bitsandbytes 4-bit layers (bf16 on GPU; float32 there is a silent slow path)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    return sorted({str(m.compute_dtype).replace("torch.", "") for m in model.modules()
                   if isinstance(m, bnb.nn.Linear4bit)})


def lookup_bandwidth(device: torch.device, override: float | None) -> tuple[float | None, str | None]:
    if override:
        return float(override), "flag"
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    for key, value in BANDWIDTH:
        if key.lower() in name.lower():
            return value, f"table:{key}"
    return None, None


def run_layout(work: Workload, layout: str, result: dict, four_model_plan: MemoryPlan | None,
               four_model_error: str | None, four_model_used: dict | None, run_root: Path) -> None:
    """Build `layout`, run warm-up + measured steps, fill `result` as it goes (a failure keeps what was measured)."""
    args, cfg, device = work.args, work.cfg, work.device
    cuda = device.type == "cuda"
    if cuda:  # what an earlier layout left behind (should be ~0): the peaks below include it
        result["allocated_at_start_bytes"] = int(torch.cuda.memory_allocated(device))
        torch.cuda.reset_peak_memory_stats(device)
    memory_plan = layout_plan(work, layout, four_model_plan, four_model_error)
    result["plan"] = {**plan_summary(memory_plan), "planned_for": "ours" if layout == "ours" else "four-model"}
    micro = dict(memory_plan.micro_batches)
    if layout == "ours-matched" and four_model_used:
        micro = dict(four_model_used)  # what the four-model layout really ran with, after any OOM halving
    micro.update(work.micro_override)
    checkpointing = gradient_checkpointing(cfg, memory_plan)

    start = time.perf_counter()
    model, weights, decode_weights = build_layout(work, layout)
    if cuda:
        torch.cuda.synchronize(device)
    result.update(build_s=time.perf_counter() - start, weight_bytes=weights, decode_weight_bytes=decode_weights,
                  compute_dtypes=compute_dtypes(model), gradient_checkpointing=checkpointing)
    model.set_gradient_checkpointing(checkpointing)
    if cuda:
        result["static_allocated_bytes"] = int(torch.cuda.memory_allocated(device))
        result["build_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))

    def scorer(rollout, runner):  # the learned reward head, micro-batched by the score phase's runner
        return model.rewards(rollout.input_ids, rollout.attention_mask, runner=runner)

    if not work.critic:  # the Python reward function TRL's GRPOTrainer gets too, on the same prompt texts
        scorer = Scorer(model, 0.0, {args.reward: (work.reward_function(), 1.0)}, work.prompt_texts(), {})

    trainer = PPOTrainer(model, cfg, work.prompts(), scorer, run_dir=run_root / layout, micro_batches=micro,
                         force_response_length=True, show_progress=False)
    # a forward hook inside a compiled step would break its graph: the compiled decoder is not watched
    probe = GenerationProbe(model.causal_lm, trainer.clock) if cfg.ppo.decode != "static-compiled" else None
    try:
        for i in range(args.warmup + args.steps):
            record = measured_step(trainer)
            record["warmup"] = i < args.warmup
            result["steps"].append(record)
            log.info("%s step %d: %.2f s %s", layout, i, record["step_time_s"],
                     {p: round(v["time_s"], 2) for p, v in record["phases"].items()})
    finally:  # also after a fatal error: keep what was measured
        if probe:
            probe.remove()
        result["oom_events"] = [e for r in trainer.runners.values() for e in r.oom_events]
        result["micro_batches"] = {p: r.micro_batch for p, r in trainer.runners.items()}
        result["generation"] = {"decode": cfg.ppo.decode, **(probe.report() if probe else {})}
        result["peak_rss_bytes"], result["peak_rss_scope"] = peak_rss_bytes(), work.rss_scope
        if result["steps"]:
            summarise(work, layout, result)


def plan_summary(memory_plan: MemoryPlan) -> dict:
    return {"fits": memory_plan.fits, "gradient_checkpointing": memory_plan.gradient_checkpointing,
            "floor_bytes": memory_plan.floor_bytes, "budget_bytes": memory_plan.budget_bytes,
            "usable_bytes": memory_plan.usable_bytes, "micro_batches": dict(memory_plan.micro_batches),
            "predicted_peak_bytes": {p: memory_plan.peak_bytes(p) for p in PHASES}}


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def ratio(a, b):
    return a / b if a is not None and b else None


def summarise(work: Workload, layout: str, result: dict) -> None:
    """Aggregate the measured (non-warm-up) steps into the layout's figures."""
    args = work.args
    measured = [s for s in result["steps"] if not s["warmup"]] or result["steps"]
    if not measured:
        return
    times = {p: mean([s["phases"].get(p, {}).get("time_s") for s in measured]) for p in PHASES}
    times["step"] = mean([s["step_time_s"] for s in measured])
    result["step_time_median_s"] = statistics.median(s["step_time_s"] for s in measured)
    peaks = {}
    for p in PHASES:
        alloc = [s["phases"][p]["allocated"] for s in measured if p in s["phases"]]
        reserved = [s["phases"][p]["reserved"] for s in measured if p in s["phases"]]
        peaks[p] = {"allocated": max(alloc) if alloc and None not in alloc else None,
                    "reserved": max(reserved) if reserved and None not in reserved else None}
    peaks["step"] = {k: (max(peaks[p][k] for p in PHASES) if all(peaks[p][k] is not None for p in PHASES) else None)
                     for k in ("allocated", "reserved")}
    micro = measured[-1]["micro_batches"]
    only_first_step = args.warmup == 0 and args.steps == 1  # its generate/score precede any optimizer state
    predicted = predicted_peaks(work.cfg, work.shape, model_layout(layout, work.critic), micro,
                                result["gradient_checkpointing"],
                                before_first_update=only_first_step)
    predicted["step"] = max(predicted.values())
    rows = work.rows
    tokens = rows * (args.prompt_len + args.response_len)
    passes = math.ceil(rows / micro["generate"])
    decode_ms = 1000 * times["generate"] / args.response_len if times["generate"] else None
    bandwidth = work.bandwidth
    floor_ms = 1000 * result["decode_weight_bytes"] / bandwidth if bandwidth else None
    result.update(
        micro_batches_measured=micro,
        time_s=times, step_time_s=times["step"], peak_bytes=peaks, predicted_peak_bytes=predicted,
        measured_over_predicted={p: ratio(peaks[p]["allocated"], predicted[p]) for p in predicted},
        generate_tokens_per_s=ratio(rows * args.response_len, times["generate"]),
        score_tokens_per_s=ratio(tokens, times["score"]),
        train_tokens_per_s=ratio(tokens * args.ppo_epochs, times["train"]),
        generate_passes=passes, decode_ms_per_step=decode_ms,
        decode_ms_per_step_per_pass=decode_ms / passes if decode_ms is not None else None,
        weight_read_floor_ms=floor_ms,
        decode_over_floor=ratio(decode_ms / passes if decode_ms is not None else None, floor_ms),
        final_kl=measured[-1]["kl"], final_score=measured[-1]["score"],
        response_length=measured[-1]["response_length"])
