"""Stop and resume for the TRL stages (SFT, reward model, DPO), as the RL loop does.

Saving and resuming are the Trainer's own (`save_steps`, `save_total_limit`, `train(resume_from_checkpoint=...)`
restore the adapter, optimizer, scheduler, RNG states and the data order). What it lacks, added here:
  - a checkpoint it was killed while writing looks whole to it (`get_last_checkpoint` takes the highest step). Each
    finished checkpoint gets our manifest (every file's size and SHA-256, run/checkpoint.py) once the Trainer is
    done with it, and a resume takes the newest checkpoint that verifies, skipping (and naming) the others;
  - a signal ends the process at once. `StopOnSignal` lets SIGTERM/SIGINT finish the optimizer step, save a
    checkpoint and end the stage; the CLI then exits 128 + signal with advice naming the stage's resume key;
  - a resume with other settings continues someone else's experiment. The checkpoint folder records the stage's
    settings (its section, model, lora, seed and the data file's SHA-256) and a resume that changes one is refused.

The checkpoints live in RUN/checkpoint-<stage>/checkpoint-<step> and are removed once the stage has saved its
adapter (they are ours and no longer needed).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

from transformers import TrainerCallback

from ..config import ConfigError, RecipeConfig, to_dict
from ..run.checkpoint import CheckpointError, verify, write_manifest
from ..run.resume_guard import file_hash
from ..run.signals import STOP_SIGNALS, Interrupted

log = logging.getLogger(__name__)

SECTIONS = {"sft": "sft", "reward": "reward_model", "dpo": "dpo"}  # stage -> its recipe section
DATA_KEYS = {"sft": "sft", "reward": "preferences", "dpo": "preferences"}  # stage -> its data.* table
SETTINGS_FILE = "settings.json"
# keys of a stage's section that do not change what it computes
NOT_MATH = ("resume", "save_steps", "save_total_limit", "enabled", "min_accuracy")


def checkpoint_dir(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / f"checkpoint-{stage}"


def stage_settings(cfg: RecipeConfig, stage: str) -> dict:
    """What a stage's checkpoint records: the settings that change its math, and its data file's SHA-256."""
    section = {k: v for k, v in to_dict(getattr(cfg, SECTIONS[stage])).items() if k not in NOT_MATH}
    source = getattr(cfg.data, DATA_KEYS[stage])
    return {SECTIONS[stage]: section, "model": to_dict(cfg.model), "lora": to_dict(cfg.lora), "seed": cfg.seed,
            "data": source, "data (sha256)": file_hash(source) if source else None}


def write_settings(folder: Path, cfg: RecipeConfig, stage: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{SETTINGS_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(stage_settings(cfg, stage), indent=1, default=str))
    os.replace(tmp, folder / SETTINGS_FILE)


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def _steps(folder: Path) -> list[tuple[int, Path]]:
    found = []
    for path in folder.glob("checkpoint-*") if folder.is_dir() else []:
        suffix = path.name.rsplit("-", 1)[-1]
        if path.is_dir() and suffix.isdigit():
            found.append((int(suffix), path))
    return sorted(found, reverse=True)


def has_checkpoints(run_dir: Path, stage: str) -> bool:
    return bool(_steps(checkpoint_dir(run_dir, stage)))


def resume_point(cfg: RecipeConfig, run_dir: Path, stage: str) -> Path:
    """The newest checkpoint of `stage` that verifies, after checking the recipe still describes its experiment."""
    key = f"{SECTIONS[stage]}.resume"
    folder = checkpoint_dir(run_dir, stage)
    steps = _steps(folder)
    if not steps:
        raise CheckpointError(f"{key}: {folder} holds no checkpoint to resume; run the stage without {key}")
    saved_path = folder / SETTINGS_FILE
    saved = json.loads(saved_path.read_text()) if saved_path.is_file() else None
    current = json.loads(json.dumps(stage_settings(cfg, stage), default=str))
    if saved is not None and saved != current:
        before, after = _flat(saved), _flat(current)
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        raise ConfigError(f"{key}: the recipe changes the experiment of {folder}: {', '.join(changed)}; set them "
                          f"back to resume it, or start the stage over with --overwrite")
    for step, path in steps:
        try:
            verify(path)
        except CheckpointError as err:
            log.warning("skipping %s: %s", path.name, err)
            continue
        log.info("%s: resuming from %s (step %d)", stage, path, step)
        return path
    raise CheckpointError(f"{key}: no checkpoint in {folder} is complete (each failed its manifest check); start "
                          f"the stage over with --overwrite")


class MarkComplete(TrainerCallback):
    """After the Trainer has written a checkpoint: our manifest of its files, the mark of a whole checkpoint."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_manifest(folder)
                for path in folder.rglob("*"):  # the data before the mark, as write_atomically does
                    if path.is_file():
                        with open(path, "rb") as fh:
                            os.fsync(fh.fileno())


class StopOnSignal(TrainerCallback):
    """SIGTERM/SIGINT: finish this optimizer step, save a checkpoint, end training. A second signal stops at once
    (the last checkpoint stays as it was)."""

    def __init__(self, stage: str):
        self.stage, self.signum = stage, 0

    def _on_signal(self, signum, frame) -> None:
        if self.signum:
            raise Interrupted(signum)
        self.signum = signum
        log.warning("%s: finishing the step, then saving a checkpoint (%s again stops at once)",
                    STOP_SIGNALS[signum], STOP_SIGNALS[signum])

    def on_step_end(self, args, state, control, **kwargs):
        if self.signum:
            control.should_save = True
            control.should_training_stop = True
        return control

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def interrupted(self, folder: Path, step: int) -> Interrupted:
        return Interrupted(self.signum, f"the {self.stage} stage saved its checkpoint at step {step} in {folder}; "
                           f"rerun the same command with {SECTIONS[self.stage]}.resume=true to continue it")
