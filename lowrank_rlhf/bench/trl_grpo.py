"""The trl-grpo layout: TRL's own GRPOTrainer on the bench's workload, beside our loop with --algorithm grpo.

The same as ours wherever TRL lets us set it:
    base         the same quantized base, loaded or built by the same code (Workload.load_base), passed as a model
    adapter      the LoRA config our roles use (roles.peft_lora_config), given as peft_config: TRL wraps the base
    reference    the adapter disabled (TRL's choice for a PEFT model with beta > 0)
    reward       the same Python function object our scorer calls, on the same prompt texts
    prompts      texts that tokenize to exactly --prompt-len ids (TRL 1.16 has no max_prompt_length)
    sampling     temperature 1, top_k 0, top_p 1, min_p none, repetition_penalty 1; every completion forced to
                 --response-len tokens with min_new_tokens, as our bench forces ours
    step         one generation batch = one optimizer step: per-device batch = generation batch = prompts x
                 num_generations, gradient_accumulation_steps 1, num_iterations 1
    update       beta, epsilon, loss_type, scale_rewards, learning rate (constant), AdamW eps 1e-5, no weight decay,
                 gradient clipping 1.0
Never the network or vLLM: report_to none, no hub push, no saving, use_vllm False, no completion logging.

What stays TRL's own (listed in the report's `not_matched`): the QLoRA cast of the adapter to bf16, its default
gradient checkpointing (unless --gradient-checkpointing on/off), its chunked fused lm_head, and torch.multinomial
sampling instead of our per-row keyed sampler (the same distribution, other random numbers).
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import torch

from ..models.random_llama import model_weight_bytes
from ..models.roles import peft_lora_config
from .measure import compute_dtypes, peak_rss_bytes
from .workload import Workload

log = logging.getLogger(__name__)

NOT_MATCHED = [
    "TRL casts the LoRA weights of a quantized base to bf16 (QLoRA); ours keeps trained adapters in fp32",
    "sampling: TRL draws with torch.multinomial, ours with a per-row keyed Gumbel sampler (same distribution)",
    "TRL computes logprobs with its fused, chunked lm_head",
    "eos ids: TRL stops on the generation config's and tokenizer's eos; ours also on the chat template's end of "
    "turn (no effect here: every completion is forced to full length)",
]


def grpo_config(work: Workload, output_dir: str):
    """TRL's GRPOConfig for the bench workload (see the module docstring for each choice)."""
    from trl import GRPOConfig

    args, ppo = work.args, work.cfg.ppo
    cuda = work.device.type == "cuda"
    extra = {}
    if args.gradient_checkpointing != "auto":
        extra["gradient_checkpointing"] = args.gradient_checkpointing == "on"
    return GRPOConfig(
        output_dir=output_dir, report_to="none", push_to_hub=False, save_strategy="no", use_vllm=False,
        log_completions=False, disable_tqdm=True, logging_steps=1, use_cpu=not cuda,
        bf16=cuda and work.dtype == torch.bfloat16, seed=args.seed, dataloader_num_workers=0,
        max_steps=args.warmup + args.steps, per_device_train_batch_size=work.rows, gradient_accumulation_steps=1,
        num_generations=args.num_generations, num_iterations=1, max_completion_length=args.response_len,
        temperature=ppo.temperature, top_k=0, top_p=1.0, min_p=None, repetition_penalty=1.0,
        generation_kwargs={"min_new_tokens": args.response_len},
        beta=ppo.beta, epsilon=ppo.epsilon, epsilon_high=ppo.epsilon_high, loss_type=ppo.loss_type,
        scale_rewards=ppo.scale_rewards, mask_truncated_completions=ppo.mask_truncated_completions,
        learning_rate=ppo.learning_rate, lr_scheduler_type="constant", optim="adamw_torch", adam_epsilon=1e-5,
        weight_decay=ppo.weight_decay, max_grad_norm=ppo.max_grad_norm, **extra)


def step_clock(device: torch.device):
    """A TrainerCallback timing each optimizer step (device synchronised) and its peak allocated memory."""
    from transformers import TrainerCallback

    cuda = device.type == "cuda"

    class StepClock(TrainerCallback):
        def __init__(self):
            self.steps: list[dict] = []

        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize(device)
            self.steps.append({"step_time_s": time.perf_counter() - self.start,
                               "peak_allocated": int(torch.cuda.max_memory_allocated(device)) if cuda else None,
                               "peak_reserved": int(torch.cuda.max_memory_reserved(device)) if cuda else None})

    return StepClock()


def run_trl_grpo(work: Workload, result: dict, run_root: Path) -> None:
    """Build TRL's GRPOTrainer on a fresh base, train warm-up + measured steps, fill `result`."""
    from datasets import Dataset
    from trl import GRPOTrainer

    args, device = work.args, work.device
    cuda = device.type == "cuda"
    if cuda:
        result["allocated_at_start_bytes"] = int(torch.cuda.memory_allocated(device))
        torch.cuda.reset_peak_memory_stats(device)
    texts = work.prompt_texts()
    start = time.perf_counter()
    base, tokenizer = work.load_base(0)
    result["weight_bytes"] = result["decode_weight_bytes"] = model_weight_bytes(base)
    clock = step_clock(device)
    out_dir = run_root / "trl-grpo"  # TRL's output_dir; with save_strategy "no" it stays (nearly) empty
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = GRPOTrainer(model=base, reward_funcs=work.reward_function(), args=grpo_config(work, str(out_dir)),
                          train_dataset=Dataset.from_dict({"prompt": texts}), processing_class=tokenizer,
                          peft_config=peft_lora_config(work.cfg.lora), callbacks=[clock])
    if cuda:
        torch.cuda.synchronize(device)
        result["static_allocated_bytes"] = int(torch.cuda.memory_allocated(device))
        result["build_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
    generation = trainer.generation_config
    result.update(build_s=time.perf_counter() - start, compute_dtypes=compute_dtypes(trainer.model),
                  gradient_checkpointing=bool(trainer.args.gradient_checkpointing),
                  micro_batches={"generate": work.rows, "score": work.rows, "train": work.rows},
                  generation={k: getattr(generation, k, None) for k in (
                      "do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens",
                      "min_new_tokens", "eos_token_id")},
                  not_matched=NOT_MATCHED, trl_adapter_dtypes=sorted(
                      {str(p.dtype).replace("torch.", "") for p in trainer.model.parameters() if p.requires_grad}))
    try:
        trainer.train()
    finally:
        history = [h for h in trainer.state.log_history if "loss" in h]
        for i, step in enumerate(clock.steps):
            logged = history[i] if i < len(history) else {}
            step.update(warmup=i < args.warmup, kl=logged.get("kl"), score=logged.get("reward"),
                        response_length=logged.get("completions/mean_length"))
        result["steps"] = clock.steps
        result["peak_rss_bytes"], result["peak_rss_scope"] = peak_rss_bytes(), work.rss_scope
        if clock.steps:
            summarise_trl(work, result)


def summarise_trl(work: Workload, result: dict) -> None:
    """The figures the report compares: step time (mean and median of the measured steps), peak allocated."""
    measured = [s for s in result["steps"] if not s["warmup"]] or result["steps"]
    times = [s["step_time_s"] for s in measured]
    peak = max(s["peak_allocated"] for s in measured) if work.device.type == "cuda" else None
    reserved = max(s["peak_reserved"] for s in measured) if work.device.type == "cuda" else None
    result.update(step_time_s=sum(times) / len(times), step_time_median_s=statistics.median(times),
                  peak_bytes={"step": {"allocated": peak, "reserved": reserved}},
                  final_kl=measured[-1]["kl"], final_score=measured[-1]["score"],
                  response_length=measured[-1]["response_length"])
