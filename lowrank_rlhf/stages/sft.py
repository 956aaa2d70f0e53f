"""Supervised fine-tuning of the `sft` adapter with TRL's SFTTrainer, on the same quantized base that PPO uses.

    train_sft(cfg, dataset, RUN)   SFTTrainer + LoRA -> RUN/sft (plain PEFT; policy and reference start as copies)

Data: prompt/completion (text or messages), a `messages` column, which is split before its last assistant message
(earlier turns are the prompt; SFT trains on that last turn), or plain `text` (trained whole). We tokenize the
examples ourselves with data.chat, exactly as a PPO rollout lays them out (the prompt's ids as PPO encodes them,
then the answer ending with eos, nothing after it), and hand TRL `input_ids` + `completion_mask`: the loss is on
the answer only (completion_only_loss). TRL's own tokenization renders prompt + answer as one string, so a template's
text after the end-of-turn token is trained and tokens merge across the prompt/answer boundary.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import datasets
import torch

from ..config import RecipeConfig
from ..data import DataError, encode_example_parts, split_messages
from ..models.loading import compute_dtype, load_base
from ..models.roles import peft_lora_config
from ..run.checkpoint import write_atomically
from .common import (
    free,
    loss_summary,
    train_and_save,
    trainable_to_compute_dtype,
    trainer_kwargs,
    update_run_metadata,
    use_loss_bar,
)

log = logging.getLogger(__name__)


def sft_examples(dataset: datasets.Dataset, tokenizer) -> datasets.Dataset:
    """input_ids + completion_mask, tokenized by data.chat exactly as a PPO rollout lays prompt and answer out.

    prompt/completion (text or messages) as they are; `messages` split before its last assistant turn; `text`
    trained whole, followed by eos."""
    cols = set(dataset.column_names)
    if "messages" in cols:
        def pair(ex):
            return split_messages(ex["messages"])
    elif {"prompt", "completion"} <= cols:
        def pair(ex):
            return ex["prompt"], ex["completion"]
    elif "text" in cols:
        def pair(ex):
            return "", ex["text"]  # all of it is the answer; the BOS, if any, is the prompt
    else:
        raise DataError(f"data.sft: SFT data needs prompt/completion, messages or text columns; got {sorted(cols)}")

    def encode(ex):
        question, answer = encode_example_parts(tokenizer, *pair(ex))
        return {"input_ids": question + answer, "completion_mask": [0] * len(question) + [1] * len(answer)}
    return dataset.map(encode, remove_columns=dataset.column_names, desc="tokenizing SFT examples")


def sft_trainer(cfg: RecipeConfig, dataset: datasets.Dataset, output_dir: str | Path):
    """SFTTrainer with a fresh LoRA adapter on the shared quantized base; completion-only loss."""
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(cfg.seed)
    base, tokenizer = load_base(cfg.model)
    args = SFTConfig(**trainer_kwargs(cfg, cfg.sft, str(output_dir)), completion_only_loss=True)
    trainer = SFTTrainer(model=base, args=args, train_dataset=sft_examples(dataset, tokenizer),
                         processing_class=tokenizer, peft_config=peft_lora_config(cfg.lora))
    trainable_to_compute_dtype(trainer.model, compute_dtype(cfg.model.dtype, base.device))
    use_loss_bar(trainer)
    return trainer


def save_sft(trainer, cfg: RecipeConfig, run_dir: str | Path) -> Path:
    """The trained adapter -> RUN/sft (plain PEFT), and `sft` into RUN/lowrank_rlhf.json."""
    run_dir = Path(run_dir)
    # adapter "default" lands in the folder itself, not in a subfolder
    write_atomically(run_dir / "sft", lambda tmp: trainer.model.save_pretrained(str(tmp)))
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
