"""`lowrank-rlhf bench`: memory and speed of PPO, our one-base layout against the four-model layout.

The same command measures a CPU run with tiny-llama or SmolLM2 and a GPU run with LLaMA-2-7B/13B; every size is a
flag. LLaMA-2 shapes are built with random weights directly in 4-bit on the GPU (random_models.py): memory and speed
do not depend on the weights' values.

Workload: `--batch` prompts of exactly `--prompt-len` random token ids, responses of exactly `--response-len` tokens
(no early EOS), `--warmup` PPO steps, then `--steps` measured ones. The scorer is the learned reward head.

Layouts, in one process, one after another, under the same memory budget (on CUDA enforced with
set_per_process_memory_fraction), each with the micro-batches the planner picks for it:
  ours          one quantized base; policy, value (trained), sft = reference, reward (frozen) as LoRA adapters
  four-model    TRL's layout: policy base + LoRA (reference = adapter disabled), a separate quantized value model
                and a separate quantized reward model (four_model.py)
  ours-matched  ours at the micro-batches the four-model layout ran with (its plan's, if it has not run before):
                the same work, so peaks differ only by the layout

Output: a JSON (--json), a markdown table (.md) and a plot (.png) next to it. Per layout: peak memory per phase
(allocated and reserved), step time, generation / scoring / training tokens per second, the planner's predicted peak
against the measured one, decode milliseconds per token step against the weight-read floor (weight bytes / memory
bandwidth); then the ratios ours / four-model and pass/fail against the targets.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import logging
import math
import platform
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

import torch

from ..memory import plan as planning
from ..config import load_recipe
from .four_model import FourModelRoles, plan_four_model, predicted_peaks
from ..memory.plan import BUDGET_FRACTION, MemoryBudgetError, MemoryPlan
from ..memory.shapes import ModelShape
from ..memory.sizes import format_bytes
from ..models.loading import compute_dtype, load_base, resolve_device
from ..models.random_llama import RANDOM_MODELS, build_random_llama, llama_config, model_weight_bytes
from ..models.roles import RoleModel
from ..rl.trainer import PHASES, PPOTrainer

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
LAYOUTS = ("ours", "four-model", "ours-matched")
# tiny shapes built with random weights, for CPU smoke runs of the random-model path
RANDOM_TINY = "random-tiny"
# Peak memory bandwidth (bytes/s) by GPU name, first match wins (vendor data sheets).
BANDWIDTH = [
    ("GH200", 4.0e12), ("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
    ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12),
    ("L40S", 0.864e12), ("L40", 0.864e12), ("L4", 0.3e12), ("A10G", 0.6e12), ("A10", 0.6e12),
    ("RTX 4090", 1.008e12), ("RTX 3090", 0.936e12), ("RTX 6000 Ada", 0.96e12), ("T4", 0.32e12), ("V100", 0.9e12),
]
# Targets from the issue (benchmark results, not timed tests).
TARGET_PEAK_BYTES = {"llama2-7b": 10 * 1024**3, "llama2-13b": 16 * 1024**3}
TARGET_PEAK_RATIO = 0.6
TARGET_STEP_RATIO = 0.8
TARGET_PLANNER_ERROR = 0.15
TARGET_DECODE_OVER_FLOOR = 5.0
TARGET_BUILD_S = 120.0


# ================================================================================================ arguments
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The bench flags (cli.py wires them to `lowrank-rlhf bench`)."""
    parser.add_argument("--model", default=None,
                        help="llama2-7b | llama2-13b (published shapes, random weights, built in place) | "
                             f"{RANDOM_TINY} | tiny-llama | smollm2-135m | a local path or hub id; "
                             "default: llama2-7b on CUDA, tiny-llama on CPU")
    parser.add_argument("--quantization", default="4bit", choices=("4bit", "8bit", "none"),
                        help="how each base is stored (default 4bit, NF4 with bf16 compute on GPU)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="default: cuda if available")
    parser.add_argument("--batch", type=int, default=32, help="rollout batch: prompts per PPO step (default 32)")
    parser.add_argument("--prompt-len", type=int, default=256, help="tokens per prompt, exactly (default 256)")
    parser.add_argument("--response-len", type=int, default=256,
                        help="tokens per response, forced: no early EOS (default 256)")
    parser.add_argument("--steps", type=int, default=3, help="measured PPO steps after the warm-up (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="PPO steps run first and not measured (default 1)")
    parser.add_argument("--budget", default="24GiB",
                        help="memory budget shared by every layout, e.g. 24GiB; on CUDA enforced with "
                             "set_per_process_memory_fraction; 'auto' = free memory (default 24GiB)")
    parser.add_argument("--layouts", default="ours,four-model",
                        help=f"comma-separated, run in this order: {', '.join(LAYOUTS)} (default ours,four-model)")
    parser.add_argument("--micro-batch", default="",
                        help="skip the planner for these phases in every layout, e.g. generate=16,score=8,train=4")
    parser.add_argument("--decode", default="generate", choices=("generate", "static", "static-compiled"),
                        help="rollout decoding (ppo.decode): generate() with a growing cache, a static cache, or a "
                             "static cache with the step compiled as CUDA graphs (default generate)")
    parser.add_argument("--gradient-checkpointing", default="auto", choices=("auto", "on", "off"),
                        help="auto = as the planner decides (default)")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank of every adapter (default 16)")
    parser.add_argument("--ppo-epochs", type=int, default=4, help="PPO epochs per step (default 4, as TRL)")
    parser.add_argument("--mini-batches", type=int, default=1, help="minibatches per PPO epoch (default 1, as TRL)")
    parser.add_argument("--bandwidth", type=float, default=None,
                        help="GPU memory bandwidth in bytes/s for the weight-read floor, e.g. 3.35e12; default: "
                             "looked up from the device name")
    parser.add_argument("--force", action="store_true",
                        help="run a layout even when the planner says it does not fit the budget at micro-batch 1")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, prompts and sampling")
    parser.add_argument("--json", default="bench.json", help="where to write the JSON; .md and .png go beside it")
    parser.add_argument("--run-dir", default=None, help="where the trainers write metrics.jsonl (default: a temp dir)")
    return parser


def parse_micro_batch(text: str) -> dict[str, int]:
    """'generate=16,score=8' -> {'generate': 16, 'score': 8}."""
    out: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in PHASES or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--micro-batch {text!r}: expected phase=N with phase in {', '.join(PHASES)} and N >= 1, "
                             f"e.g. generate=16,score=8,train=4")
        out[key.strip()] = int(value)
    return out


def parse_layouts(text: str) -> list[str]:
    layouts = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in layouts if x not in LAYOUTS]
    if bad or not layouts:
        raise ValueError(f"--layouts {text!r}: allowed layouts: {', '.join(LAYOUTS)}")
    return list(dict.fromkeys(layouts))


# ================================================================================================ measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BenchTrainer(PPOTrainer):
    """PPOTrainer with each phase timed and its peak memory taken (the peak counter is reset at every phase start)."""

    def __init__(self, *args, probe: "GenerationProbe | None" = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.cuda = self.model.device.type == "cuda"
        self.probe = probe
        self.phase_log: dict[str, dict] = {}

    @contextmanager
    def _measure(self, phase: str):
        device = self.model.device
        _sync(device)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        try:
            yield
        finally:
            _sync(device)
            self.phase_log[phase] = {
                "time_s": time.perf_counter() - start,
                "allocated": int(torch.cuda.max_memory_allocated(device)) if self.cuda else None,
                "reserved": int(torch.cuda.max_memory_reserved(device)) if self.cuda else None,
            }

    def rollout(self):
        with self._measure("generate"), (self.probe.watching() if self.probe else nullcontext()):
            return super().rollout()

    def score(self, rollout):
        with self._measure("score"):
            return super().score(rollout)

    def update(self, rollout, scored, advantages, returns):
        with self._measure("train"):
            return super().update(rollout, scored, advantages, returns)

    def measured_step(self) -> dict:
        """One train_step with its wall time (device synchronised), per-phase times and peaks."""
        self.phase_log = {}
        _sync(self.model.device)
        start = time.perf_counter()
        metrics = self.train_step()
        _sync(self.model.device)
        return {"step_time_s": time.perf_counter() - start, "phases": self.phase_log,
                "micro_batches": {p: r.micro_batch for p, r in self.runners.items()},
                "kl": metrics["objective/kl"], "score": metrics["objective/scores"],
                "response_length": metrics["val/response_length"]}


class GenerationProbe:
    """Watches the policy model's forward calls during the rollout. With the KV cache on, each generate pass is one
    prefill (empty cache) followed by decode calls that feed exactly one new token per row; gradient checkpointing
    and training mode must be off throughout (checkpointing disables the cache and makes decoding quadratic)."""

    def __init__(self, causal_lm):
        self.active = False
        self.prefill_calls = self.decode_calls = self.single_token_decode_calls = 0
        self.checkpointing_seen = self.training_seen = False
        self.handle = causal_lm.register_forward_pre_hook(self._hook, with_kwargs=True)

    @contextmanager
    def watching(self):
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def _hook(self, module, args, kwargs):
        if not self.active:
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


# ================================================================================================ building layouts
class Workload:
    """Everything the layouts share: the recipe, the shape, the budget, the device and the prompts."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = resolve_device(args.device)
        self.model_name = args.model or ("llama2-7b" if self.device.type == "cuda" else "tiny-llama")
        self.random = self.model_name in RANDOM_MODELS or self.model_name == RANDOM_TINY
        self.dtype = compute_dtype("auto", self.device)
        self.budget_bytes = planning.resolve_budget(args.budget, self.device)
        self.micro_override = parse_micro_batch(args.micro_batch)
        self.layouts = parse_layouts(args.layouts)
        total_steps = args.warmup + args.steps
        q = json.dumps  # quoted: YAML would read on/off as booleans
        self.cfg = load_recipe(None, [
            f"model.name={q(self.model_name)}", f"model.quantization={q(args.quantization)}",
            f"model.device={q(self.device.type)}", f"lora.r={args.lora_r}", f"lora.alpha={2 * args.lora_r}",
            f"seed={args.seed}", f"memory.gradient_checkpointing={q(args.gradient_checkpointing)}",
            f"data.max_prompt_length={args.prompt_len}", f"ppo.rollout_batch_size={args.batch}",
            f"ppo.response_length={args.response_len}", f"ppo.total_steps={total_steps}",
            f"ppo.num_ppo_epochs={args.ppo_epochs}", f"ppo.num_mini_batches={args.mini_batches}",
            "ppo.temperature=1.0", "ppo.lr_scheduler_type=constant", f"ppo.decode={q(args.decode)}"])
        self.hf_config = self._hf_config()
        self.shape = ModelShape.from_hf_config(self.hf_config)
        self.bandwidth: float | None = None

    def _hf_config(self):
        if self.model_name == RANDOM_TINY:
            return tiny_random_config()
        if self.random:
            return llama_config(self.model_name)
        from transformers import AutoConfig

        from ..models.loading import resolve_model_path
        return AutoConfig.from_pretrained(resolve_model_path(self.model_name))

    def load_base(self, index: int = 0):
        """A fresh base: random weights built in place, or loaded from a checkpoint."""
        if self.random:
            config = tiny_random_config() if self.model_name == RANDOM_TINY else llama_config(self.model_name)
            return build_random_llama(config, self.args.quantization, self.device, self.dtype,
                                      seed=self.args.seed + index)
        return load_base(self.cfg.model)

    def prompts(self) -> list[list[int]]:
        """One distinct prompt per row and step, each exactly prompt_len random ids above the special tokens."""
        n = self.args.batch * (self.args.warmup + self.args.steps)
        low = min(3, self.hf_config.vocab_size - 1)
        g = torch.Generator().manual_seed(self.args.seed)
        return torch.randint(low, self.hf_config.vocab_size, (n, self.args.prompt_len), generator=g).tolist()


def tiny_random_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def build_layout(work: Workload, layout: str) -> tuple[RoleModel | FourModelRoles, int, int]:
    """(model, bytes of all its bases, bytes of the base read per decode step)."""
    cfg = work.cfg
    common = dict(base_name=work.model_name, quantization=cfg.model.quantization, seed=cfg.seed)
    if layout == "four-model":
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


class DoesNotFit(MemoryBudgetError):
    """The planner says a layout cannot run in the budget, even at micro-batch 1 (run it anyway with --force)."""


def layout_plan(work: Workload, layout: str, four_model_plan: MemoryPlan | None, four_model_error: str | None
                ) -> MemoryPlan:
    if layout == "ours":
        memory_plan = planning.plan_recipe(work.cfg, work.budget_bytes, shape=work.shape)
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


# ================================================================================================ one layout
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
    checkpointing = planning.gradient_checkpointing(cfg, memory_plan)

    start = time.perf_counter()
    model, weights, decode_weights = build_layout(work, "four-model" if layout == "four-model" else "ours")
    _sync(device)
    result.update(build_s=time.perf_counter() - start, weight_bytes=weights, decode_weight_bytes=decode_weights,
                  compute_dtypes=compute_dtypes(model), gradient_checkpointing=checkpointing)
    model.set_gradient_checkpointing(checkpointing)
    if cuda:
        result["static_allocated_bytes"] = int(torch.cuda.memory_allocated(device))
        result["build_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))

    def scorer(rollout, runner):  # the learned reward head, micro-batched by the score phase's runner
        return model.rewards(rollout.input_ids, rollout.attention_mask, runner=runner)

    # a forward hook inside a compiled step would break its graph: the compiled decoder is not watched
    probe = GenerationProbe(model.causal_lm) if cfg.ppo.decode != "static-compiled" else None
    trainer = BenchTrainer(model, cfg, work.prompts(), scorer, run_dir=run_root / layout, micro_batches=micro,
                           force_response_length=True, show_progress=False, probe=probe)
    try:
        for i in range(args.warmup + args.steps):
            record = trainer.measured_step()
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
        if result["steps"]:
            summarise(work, layout, result)


def plan_summary(memory_plan: MemoryPlan) -> dict:
    return {"fits": memory_plan.fits, "gradient_checkpointing": memory_plan.gradient_checkpointing,
            "floor_bytes": memory_plan.floor_bytes, "budget_bytes": memory_plan.budget_bytes,
            "usable_bytes": memory_plan.usable_bytes, "micro_batches": dict(memory_plan.micro_batches),
            "predicted_peak_bytes": {p: memory_plan.peak_bytes(p) for p in PHASES}}


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _ratio(a, b):
    return a / b if a is not None and b else None


def summarise(work: Workload, layout: str, result: dict) -> None:
    """Aggregate the measured (non-warm-up) steps into the layout's figures."""
    args = work.args
    measured = [s for s in result["steps"] if not s["warmup"]] or result["steps"]
    if not measured:
        return
    times = {p: _mean([s["phases"].get(p, {}).get("time_s") for s in measured]) for p in PHASES}
    times["step"] = _mean([s["step_time_s"] for s in measured])
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
    predicted = predicted_peaks(work.cfg, work.shape, "four-model" if layout == "four-model" else "ours", micro,
                                result["gradient_checkpointing"], before_first_update=only_first_step)
    predicted["step"] = max(predicted.values())
    tokens = args.batch * (args.prompt_len + args.response_len)
    passes = math.ceil(args.batch / micro["generate"])
    decode_ms = 1000 * times["generate"] / args.response_len if times["generate"] else None
    bandwidth = work.bandwidth
    floor_ms = 1000 * result["decode_weight_bytes"] / bandwidth if bandwidth else None
    result.update(
        micro_batches_measured=micro,
        time_s=times, step_time_s=times["step"], peak_bytes=peaks, predicted_peak_bytes=predicted,
        measured_over_predicted={p: _ratio(peaks[p]["allocated"], predicted[p]) for p in predicted},
        generate_tokens_per_s=_ratio(args.batch * args.response_len, times["generate"]),
        score_tokens_per_s=_ratio(tokens, times["score"]),
        train_tokens_per_s=_ratio(tokens * args.ppo_epochs, times["train"]),
        generate_passes=passes, decode_ms_per_step=decode_ms,
        decode_ms_per_step_per_pass=decode_ms / passes if decode_ms is not None else None,
        weight_read_floor_ms=floor_ms,
        decode_over_floor=_ratio(decode_ms / passes if decode_ms is not None else None, floor_ms),
        final_kl=measured[-1]["kl"], final_score=measured[-1]["score"],
        response_length=measured[-1]["response_length"])


# ================================================================================================ the whole run
def _versions() -> dict:
    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            **{name: version(name) for name in ("transformers", "peft", "bitsandbytes", "accelerate",
                                                "lowrank_rlhf")}}


def _device_info(device: torch.device, bandwidth: float | None, source: str | None) -> dict:
    cuda = device.type == "cuda"
    return {"type": device.type, "name": torch.cuda.get_device_name(device) if cuda else platform.processor() or
            platform.machine(), "total_memory_bytes": torch.cuda.get_device_properties(device).total_memory
            if cuda else None, "bandwidth_bytes_per_s": bandwidth, "bandwidth_source": source}


LAYOUT_KEYS = (
    "layout", "status", "error", "plan", "build_s", "weight_bytes", "decode_weight_bytes", "allocated_at_start_bytes",
    "static_allocated_bytes", "build_peak_allocated_bytes", "compute_dtypes", "gradient_checkpointing",
    "micro_batches", "micro_batches_measured", "peak_bytes", "predicted_peak_bytes", "measured_over_predicted",
    "time_s", "step_time_s", "generate_tokens_per_s", "score_tokens_per_s", "train_tokens_per_s", "generate_passes",
    "decode_ms_per_step", "decode_ms_per_step_per_pass", "weight_read_floor_ms", "decode_over_floor", "oom_events",
    "generation", "final_kl", "final_score", "response_length", "steps")


def empty_layout(name: str) -> dict:
    """Every key of a layout's result, so the JSON has one schema whether a layout ran, failed or did not fit."""
    result = dict.fromkeys(LAYOUT_KEYS)
    result.update(layout=name, status="pending", compute_dtypes=[], oom_events=[], steps=[])
    return result


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def run_bench(args: argparse.Namespace) -> dict:
    """Run every asked layout and return the report (also written to --json, .md and .png)."""
    work = Workload(args)
    device = work.device
    work.bandwidth, bandwidth_source = lookup_bandwidth(device, args.bandwidth)
    report = {
        "schema_version": SCHEMA_VERSION,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": _device_info(device, work.bandwidth, bandwidth_source),
        "versions": _versions(),
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "func"},
        "model": {"name": work.model_name, "random_weights": work.random, "quantization": args.quantization,
                  "compute_dtype": str(work.dtype).replace("torch.", ""), "shape": asdict(work.shape)},
        "workload": {"batch": args.batch, "prompt_len": args.prompt_len, "response_len": args.response_len,
                     "warmup_steps": args.warmup, "measured_steps": args.steps, "ppo_epochs": args.ppo_epochs,
                     "mini_batches": args.mini_batches, "lora_r": args.lora_r,
                     "tokens_per_step": args.batch * (args.prompt_len + args.response_len)},
        "budget_bytes": work.budget_bytes,
        "layouts": {},
        "ratios": {},
        "checks": [],
    }
    if device.type == "cuda":
        planning.enforce_budget(work.budget_bytes, device)
    four_plan, four_plan_error = None, None
    try:
        four_plan = plan_four_model(work.cfg, work.budget_bytes, work.shape)
    except ValueError as err:  # MemoryBudgetError: the three bases alone exceed the budget
        four_plan_error = str(err)
    with tempfile.TemporaryDirectory(prefix="lowrank_rlhf_bench_") as tmp:
        run_root = Path(args.run_dir) if args.run_dir else Path(tmp)
        for layout in work.layouts:
            result = report["layouts"][layout] = empty_layout(layout)
            four = report["layouts"].get("four-model")
            used = four["micro_batches_measured"] if four and four["status"] == "ok" else None
            status, error = "ok", None
            try:
                run_layout(work, layout, result, four_plan, four_plan_error, used, run_root)
            except (KeyboardInterrupt, SystemExit):
                raise
            except MemoryBudgetError as err:  # the planner: not even micro-batch 1 fits; nothing was built
                status, error = "does-not-fit", f"{type(err).__name__}: {err}"
            except Exception as err:  # e.g. an OOM at micro-batch 1: record it and go on with the other layouts
                status, error = "error", f"{type(err).__name__}: {_first_line(err)}"
                result["traceback"] = traceback.format_exc(limit=8)
            # outside the except block: the traceback and the tensors its frames held are gone
            result["status"], result["error"] = status, error
            if error:
                log.warning("layout %s: %s", layout, error)
            free_memory(device)
            # after every layout, so a run cut short by a time limit still leaves its measurements
            report["ratios"] = ratios(report["layouts"])
            report["checks"] = checks(report, work)
            write_outputs(report, Path(args.json))
    return report


RATIO_KEYS = ("peak_allocated", "peak_reserved", "step_time_s", "generate_tokens_per_s", "train_tokens_per_s",
              "decode_ms_per_step")


def _figures(result: dict) -> dict:
    peak = result.get("peak_bytes") or {}
    step = peak.get("step", {})
    return {"peak_allocated": step.get("allocated"), "peak_reserved": step.get("reserved"),
            "step_time_s": result.get("step_time_s"), "generate_tokens_per_s": result.get("generate_tokens_per_s"),
            "train_tokens_per_s": result.get("train_tokens_per_s"),
            "decode_ms_per_step": result.get("decode_ms_per_step"),
            **{f"peak_allocated_{p}": (peak.get(p) or {}).get("allocated") for p in PHASES}}


def ratios(layouts: dict) -> dict:
    """ours / four-model (and ours-matched / four-model) for every figure both layouts measured."""
    base = layouts.get("four-model")
    out = {}
    for name in ("ours", "ours-matched"):
        mine = layouts.get(name)
        if not base or not mine or base["status"] != "ok" or mine["status"] != "ok":
            continue
        a, b = _figures(mine), _figures(base)
        out[f"{name}/four-model"] = {k: _ratio(a[k], b[k]) for k in a}
    return out


def _check(name: str, value, target: float, op: str) -> dict:
    passed = None if value is None else (value <= target if op == "<=" else value >= target)
    return {"name": name, "value": value, "target": f"{op} {target:g}", "passed": passed}


def checks(report: dict, work: Workload) -> list[dict]:
    """The issue's targets, evaluated where this run measured them (None = not measured here)."""
    out = []
    layouts = report["layouts"]
    ours = layouts.get("ours")
    if ours and ours["status"] == "ok":
        peak = (ours["peak_bytes"] or {}).get("step", {}).get("allocated")
        if work.model_name in TARGET_PEAK_BYTES:
            out.append(_check(f"ours peak allocated on {work.model_name} (GiB)", peak / 1024**3 if peak else None,
                              TARGET_PEAK_BYTES[work.model_name] / 1024**3, "<="))
        for phase in PHASES:
            ratio = (ours["measured_over_predicted"] or {}).get(phase)
            out.append(_check(f"ours planner error, {phase}: abs(measured/predicted - 1)",
                              abs(ratio - 1) if ratio is not None else None, TARGET_PLANNER_ERROR, "<="))
        if work.args.batch >= 32:
            out.append(_check(f"ours decode per pass (micro-batch {ours['micro_batches']['generate']}) / "
                              f"weight-read floor", ours["decode_over_floor"], TARGET_DECODE_OVER_FLOOR, "<="))
        if work.random and work.device.type == "cuda":
            out.append(_check("random base build time (s)", ours["build_s"], TARGET_BUILD_S, "<="))
    for key, figures in report["ratios"].items():
        out.append(_check(f"{key} peak allocated", figures["peak_allocated"], TARGET_PEAK_RATIO, "<="))
        out.append(_check(f"{key} step time", figures["step_time_s"], TARGET_STEP_RATIO, "<="))
    return out


# ================================================================================================ outputs
def _gib(n) -> str:
    return "-" if n is None else format_bytes(n)


def _num(x, fmt="{:.3g}") -> str:
    return "-" if x is None else fmt.format(x)


def markdown(report: dict) -> str:
    layouts = [r for r in report["layouts"].values()]
    dev, model, w = report["device"], report["model"], report["workload"]
    lines = [f"# lowrank-rlhf bench: {model['name']} ({model['quantization']}) on {dev['name']}", "",
             f"{report['date']} - batch {w['batch']}, prompt {w['prompt_len']}, response {w['response_len']} "
             f"(forced), {w['measured_steps']} measured steps after {w['warmup_steps']} warm-up, "
             f"{w['ppo_epochs']} PPO epochs, LoRA r={w['lora_r']}, budget {_gib(report['budget_bytes'])}; "
             f"torch {report['versions']['torch']}, bitsandbytes {report['versions']['bitsandbytes']}", ""]
    header = "| | " + " | ".join(r["layout"] for r in layouts) + " |"
    lines += [header, "|---" * (len(layouts) + 1) + "|"]

    def row(label, fn):
        cells = []
        for r in layouts:
            try:
                cells.append(fn(r) if r["status"] == "ok" else r["status"])
            except (KeyError, TypeError):
                cells.append("-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    def peak(phase, kind):
        return lambda r: _gib(r["peak_bytes"][phase][kind])

    row("micro-batches gen/score/train", lambda r: "/".join(str(r["micro_batches"][p]) for p in PHASES))
    row("gradient checkpointing", lambda r: "on" if r["gradient_checkpointing"] else "off")
    row("weights", lambda r: _gib(r["weight_bytes"]))
    for phase in PHASES:
        row(f"peak {phase} allocated / reserved",
            lambda r, p=phase: f"{peak(p, 'allocated')(r)} / {peak(p, 'reserved')(r)}")
        row(f"planner {phase} predicted [measured/predicted]",
            lambda r, p=phase: f"{_gib(r['predicted_peak_bytes'][p])} [{_num(r['measured_over_predicted'][p])}]")
    row("step time (s)", lambda r: _num(r["step_time_s"]))
    row("generate / score / train (s)", lambda r: " / ".join(_num(r["time_s"][p]) for p in PHASES))
    row("generation tokens/s", lambda r: _num(r["generate_tokens_per_s"], "{:.1f}"))
    row("training tokens/s", lambda r: _num(r["train_tokens_per_s"], "{:.1f}"))
    row("decode ms/step (per pass)",
        lambda r: f"{_num(r['decode_ms_per_step'])} ({_num(r['decode_ms_per_step_per_pass'])})")
    row("weight-read floor ms [decode/floor]",
        lambda r: f"{_num(r['weight_read_floor_ms'])} [{_num(r['decode_over_floor'])}]")
    row("OOM events", lambda r: str(len(r["oom_events"])))
    lines.append("\nPeaks are per phase (the counter is reset at each phase's start), maximum over the measured "
                 "steps; reserved includes the allocator's cache carried over from earlier phases. Decode ms/step = "
                 "generate time / response length; per pass = divided by the number of generate micro-batches.")
    for r in layouts:
        if r["error"]:
            lines.append(f"\n**{r['layout']}: {r['status']}** - {r['error']}")
    if report["ratios"]:
        lines += ["", "| ratio | peak alloc | peak reserved | step time | gen tokens/s | train tokens/s |",
                  "|---|---|---|---|---|---|"]
        for key, f in report["ratios"].items():
            lines.append(f"| {key} | {_num(f['peak_allocated'])} | {_num(f['peak_reserved'])} | "
                         f"{_num(f['step_time_s'])} | {_num(f['generate_tokens_per_s'])} | "
                         f"{_num(f['train_tokens_per_s'])} |")
    if report["checks"]:
        lines += ["", "| target | value | goal | pass |", "|---|---|---|---|"]
        for c in report["checks"]:
            verdict = {True: "yes", False: "NO", None: "-"}[c["passed"]]
            lines.append(f"| {c['name']} | {_num(c['value'])} | {c['target']} | {verdict} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Peak memory per phase per layout (allocated bars, reserved outlines, planner estimates as ticks) and the
    step time per layout split by phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["layouts"].values() if r["status"] == "ok"]
    colors = {"ours": "tab:blue", "four-model": "tab:red", "ours-matched": "tab:cyan"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(ok))
    has_memory = any(r["peak_bytes"]["step"]["allocated"] is not None for r in ok)
    for i, r in enumerate(ok):
        xs = [j + i * width for j in range(len(PHASES))]
        alloc = [(r["peak_bytes"][p]["allocated"] or 0) / 1024**3 for p in PHASES]
        reserved = [(r["peak_bytes"][p]["reserved"] or 0) / 1024**3 for p in PHASES]
        predicted = [r["predicted_peak_bytes"][p] / 1024**3 for p in PHASES]
        color = colors.get(r["layout"])
        left.bar(xs, alloc, width, color=color, label=f"{r['layout']} allocated")
        left.bar(xs, reserved, width, fill=False, edgecolor=color, linestyle="--")
        left.scatter(xs, predicted, marker="_", s=400, color="black", zorder=3,
                     label="planner estimate" if i == 0 else None)
    left.set_xticks([j + width * (len(ok) - 1) / 2 for j in range(len(PHASES))], PHASES)
    left.set_ylabel("peak memory (GiB); dashed = reserved")
    left.set_title("peak memory per phase" + ("" if has_memory else " (no CUDA: planner estimates only)"))
    if has_memory:
        left.axhline(report["budget_bytes"] / 1024**3, color="grey", linewidth=0.8, linestyle=":")
    if ok:
        left.legend(fontsize=8)
    bottom = [0.0] * len(ok)
    for phase, shade in zip(PHASES, ("0.25", "0.5", "0.75")):
        values = [r["time_s"][phase] or 0 for r in ok]
        right.bar([r["layout"] for r in ok], values, bottom=bottom, label=phase, color=shade,
                  edgecolor=[colors.get(r["layout"]) for r in ok], linewidth=2)
        bottom = [b + v for b, v in zip(bottom, values)]
    right.set_ylabel("seconds per PPO step")
    right.set_title("step time")
    if ok:
        right.legend(fontsize=8)
    model = report["model"]
    fig.suptitle(f"{model['name']} ({model['quantization']}) on {report['device']['name']}, batch "
                 f"{report['workload']['batch']}, {report['workload']['prompt_len']}+"
                 f"{report['workload']['response_len']} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict, json_path: Path) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    md_path, png_path = json_path.with_suffix(".md"), json_path.with_suffix(".png")
    report["outputs"] = {"json": str(json_path), "markdown": str(md_path), "plot": str(png_path)}
    json_path.write_text(json.dumps(report, indent=2, default=str))
    md_path.write_text(markdown(report))
    plot(report, png_path)


# ================================================================================================ entry points
def run(args: argparse.Namespace) -> int:
    """`lowrank-rlhf bench`: 0 when every layout ran, 1 when one failed (its error is in the JSON)."""
    if args.batch < 1 or args.prompt_len < 1 or args.response_len < 1 or args.steps < 1 or args.warmup < 0:
        raise SystemExit("bench: --batch, --prompt-len, --response-len and --steps must be >= 1, --warmup >= 0")
    if args.mini_batches < 1 or args.batch % args.mini_batches:
        raise SystemExit(f"bench: --batch ({args.batch}) must be divisible by --mini-batches ({args.mini_batches})")
    report = run_bench(args)
    print(markdown(report))
    print(f"wrote {report['outputs']['json']}, {report['outputs']['markdown']}, {report['outputs']['plot']}")
    return 0 if all(r["status"] == "ok" for r in report["layouts"].values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m lowrank_rlhf.bench", description=__doc__.split(
        "\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
