"""What the SFT and reward stages share: TrainingArguments, a progress bar with the loss, the fix for TRL's bf16 cast,
a scratch output_dir, train-then-save, and the run directory's metadata (RUN/lowrank_rlhf.json).

TRL quirks handled here (trl 1.16):
  - On a 4-bit/8-bit model both trainers cast every trainable parameter (LoRA and the `score` head) to bfloat16,
    even with bf16=False. On CPU the hidden states stay float32 and the score head fails ("expected m1 and m2 to
    have the same dtype"); LoRA silently runs in bf16. `trainable_to_compute_dtype` casts the trainable parameters
    back to the compute dtype (bf16 on CUDA, as TRL wants; float32 on CPU) after the trainer is built, before
    train(). An unquantized base is left alone: TRL does not cast there.
  - TRL's config defaults are bf16=True and gradient_checkpointing=True; `trainer_kwargs` sets both explicitly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from accelerate.utils.memory import clear_device_cache
from transformers.trainer_callback import ProgressCallback

from ..config import RecipeConfig
from ..models.loading import compute_dtype, resolve_device
from ..run.metadata import META_FILE, check_base, run_metadata
from . import checkpoints


def trainer_kwargs(cfg: RecipeConfig, stage, output_dir: str) -> dict:
    """TrainingArguments shared by the stages: our stage config, no network, checkpoints every save_steps (and on a
    stop signal, checkpoints.py), a progress bar."""
    device = resolve_device(cfg.model.device)
    dtype = compute_dtype(cfg.model.dtype, device)
    ckpt = {"on": True, "off": False}.get(cfg.memory.gradient_checkpointing, device.type == "cuda")
    return dict(output_dir=output_dir, num_train_epochs=stage.epochs, max_steps=stage.max_steps,
                learning_rate=stage.learning_rate, per_device_train_batch_size=stage.batch_size,
                gradient_accumulation_steps=stage.gradient_accumulation_steps, max_length=stage.max_length,
                bf16=device.type == "cuda" and dtype == torch.bfloat16, fp16=False, use_cpu=device.type == "cpu",
                activation_checkpointing=ckpt, activation_checkpointing_kwargs={"use_reentrant": False},
                seed=cfg.seed, data_seed=cfg.seed, report_to="none", eval_strategy="no",
                save_strategy="steps" if stage.save_steps else "no", save_steps=stage.save_steps or 500,
                save_total_limit=stage.save_total_limit,
                logging_steps=1, disable_tqdm=False, push_to_hub=False)


class LossBar(ProgressCallback):
    """The progress bar shows the latest loss (logged every step) instead of printing one line per log."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            shown = {k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "accuracy", "margin")}
            if shown:
                self.training_bar.set_postfix(shown, refresh=False)


def use_loss_bar(trainer) -> None:
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LossBar)


def trainable_to_compute_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Undo TRL's bf16 cast of LoRA and score weights on quantized models (see the module docstring). A no-op on
    CUDA (compute dtype bf16) and for an unquantized base, whose LoRA weights PEFT keeps in float32."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not (getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)):
        return
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)


def loss_summary(trainer, result) -> dict:
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"train_loss": float(result.training_loss),
            "train_loss_first": losses[0] if losses else float("nan"),
            "train_loss_last": losses[-1] if losses else float("nan"),
            "steps": int(result.global_step)}


def check_run_dir(run_dir: Path, model_config, cfg: RecipeConfig) -> None:
    """Fail before training, not after, when the run directory holds adapters of another base."""
    path = run_dir / META_FILE
    if path.is_file():
        check_base(json.loads(path.read_text()), model_config, cfg.model.name, run_dir)


def update_run_metadata(run_dir: Path, model_config, cfg: RecipeConfig, role: str, head: str | None = None) -> dict:
    """Merge `role` (and `head`) into RUN/lowrank_rlhf.json, in RoleModel.metadata()'s format."""
    path = run_dir / META_FILE
    meta = json.loads(path.read_text()) if path.is_file() else {}
    if meta:
        check_base(meta, model_config, cfg.model.name, run_dir)
    roles = list(meta.get("roles", []))
    heads = list(meta.get("heads", []))
    roles += [role] if role not in roles else []
    heads += [head] if head and head not in heads else []
    meta.update(run_metadata(model_config, cfg.model.name, cfg.model.quantization,
                             getattr(model_config, "dtype", None), roles, meta.get("critic", cfg.lora.critic), heads,
                             cfg.lora))
    path.write_text(json.dumps(meta, indent=2))
    return meta


def train_and_save(cfg: RecipeConfig, run_dir: Path, stage: str, make_trainer, save):
    """Build a TRL trainer whose output_dir is the stage's checkpoint folder, refuse a run directory of another
    base before training, train (from the newest complete checkpoint with <section>.resume), then save the stage's
    adapter with `save(trainer, cfg, run_dir)` and drop the checkpoints. A stop signal ends in Interrupted after a
    checkpoint was saved. Returns (trainer, TrainOutput)."""
    section = getattr(cfg, checkpoints.SECTIONS[stage])
    folder = checkpoints.checkpoint_dir(run_dir, stage)
    resume_from = checkpoints.resume_point(cfg, run_dir, stage) if section.resume else None
    if resume_from is None and folder.exists():  # an earlier try's checkpoints (ours): this run starts over
        shutil.rmtree(folder)
    checkpoints.write_settings(folder, cfg, stage)
    trainer = make_trainer(folder)
    check_run_dir(run_dir, trainer.model.get_base_model().config, cfg)
    stopper = checkpoints.StopOnSignal(stage)
    trainer.add_callback(checkpoints.MarkComplete())
    trainer.add_callback(stopper)
    with stopper.installed():
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if stopper.signum:
        raise stopper.interrupted(folder, trainer.state.global_step)
    save(trainer, cfg, run_dir)
    shutil.rmtree(folder, ignore_errors=True)  # the adapter is saved: the stage's checkpoints are done with
    return trainer, result


def free() -> None:
    """Return memory after the caller dropped its references (a trainer holds the model and optimizer)."""
    clear_device_cache(garbage_collection=True)
