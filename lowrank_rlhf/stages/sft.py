"""Supervised fine-tuning of the `sft` adapter with TRL's SFTTrainer, on the same quantized base that PPO uses.

    train_sft(cfg, dataset, RUN)   SFTTrainer + LoRA -> RUN/sft (plain PEFT; policy and reference start as copies)

Data: prompt/completion (text or messages) or a `messages` column, which is split before its last assistant message
(earlier turns are the prompt; SFT trains on that last turn). TRL renders them as PPO's prompts are rendered
(data.chat): plain text as prompt + completion + eos, conversations through the chat template with the assistant
turn opened. The loss is on the completion only, via TRL's completion_only_loss, which works with any template
(assistant_only_loss needs {% generation %} markers that most templates lack).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import datasets
import torch

from ..checkpoint import write_atomically
from ..config import RecipeConfig
from ..data import DataError, split_messages
from ..models.loading import compute_dtype, load_base
from ..models.roles import peft_lora_config
from .common import (free, loss_summary, train_and_save, trainable_to_compute_dtype, trainer_kwargs,
                     update_run_metadata, use_loss_bar)

log = logging.getLogger(__name__)


def sft_examples(dataset: datasets.Dataset) -> datasets.Dataset:
    """prompt/completion (text or messages) as they are, or `messages` split before its last assistant turn."""
    cols = set(dataset.column_names)
    if "messages" in cols:
        def split(ex):
            prompt, completion = split_messages(ex["messages"])
            return {"prompt": prompt, "completion": completion}
        return dataset.map(split, remove_columns=dataset.column_names, desc="SFT examples")
    if {"prompt", "completion"} <= cols:
        return dataset.select_columns(["prompt", "completion"])
    raise DataError(f"data.sft: SFT data needs prompt/completion or messages columns; got {sorted(cols)}")


def sft_trainer(cfg: RecipeConfig, dataset: datasets.Dataset, output_dir: str | Path):
    """SFTTrainer with a fresh LoRA adapter on the shared quantized base; completion-only loss."""
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(cfg.seed)
    base, tokenizer = load_base(cfg.model)
    args = SFTConfig(**trainer_kwargs(cfg, cfg.sft, str(output_dir)), completion_only_loss=True)
    trainer = SFTTrainer(model=base, args=args, train_dataset=sft_examples(dataset),
                         processing_class=tokenizer, peft_config=peft_lora_config(cfg.lora))
    trainable_to_compute_dtype(trainer.model, compute_dtype(cfg.model.dtype, base.device))
    use_loss_bar(trainer)
    return trainer


def save_sft(trainer, cfg: RecipeConfig, run_dir: str | Path) -> Path:
    """The trained adapter -> RUN/sft (plain PEFT), and `sft` into RUN/lowrank_rlhf.json."""
    run_dir = Path(run_dir)
    # adapter "default" lands in the folder itself, not in a subfolder
    write_atomically(run_dir / "sft", lambda tmp: trainer.model.save_pretrained(str(tmp)), manifest=False)
    if (run_dir / "policy").is_dir():
        log.warning("%s/policy exists and does not start from the new sft adapter; delete it to restart PPO", run_dir)
    update_run_metadata(run_dir, trainer.model.get_base_model().config, cfg, "sft")
    return run_dir / "sft"


def train_sft(cfg: RecipeConfig, dataset: datasets.Dataset, run_dir: str | Path) -> dict:
    """Supervised fine-tuning of the `sft` adapter; writes RUN/sft. Returns loss, steps and seconds."""
    run_dir = Path(run_dir)
    start = time.perf_counter()
    trainer, result = train_and_save(cfg, run_dir, "sft", lambda out: sft_trainer(cfg, dataset, out), save_sft)
    metrics = {**loss_summary(trainer, result), "examples": len(trainer.train_dataset),
               "seconds": time.perf_counter() - start}
    del trainer
    free()
    return metrics
