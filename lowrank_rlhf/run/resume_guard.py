"""Resume guards the experiment: a checkpoint records the settings it was trained with (every recipe key, plus
SHA-256 hashes of the prompt file and of reward functions given as files), and `ppo.resume=true` with a recipe
that changes the math is refused with a one-line diff. Settings that only change logging, saving, evaluation or
how far the run goes are accepted, and the run says which.

Every key is guarded unless listed below: a new recipe key is safe by default.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from ..config import ConfigError, RecipeConfig, to_dict

log = logging.getLogger(__name__)

# Keys that never change what PPO computes: where and how often it logs, saves and evaluates, when it stops, the
# device, and the memory plan (micro-batches never change the math, memory/runner.py).
NOT_MATH = ("run_dir", "ppo.total_steps", "ppo.save_steps", "ppo.resume", "ppo.report_to", "ppo.eval_steps",
            "ppo.best_metric", "ppo.overoptimization_patience", "ppo.stop_on_overoptimization", "ppo.max_nan_skips",
            "data.eval_prompts", "rewards.eval_functions", "rewards.timeout_s", "reward_model.min_accuracy",
            "model.device", "memory.", "ppo.logits_chunk_tokens",  # chunking, like micro-batches, sums the same terms
            "dpo.")  # dpo.*: the DPO stage's settings, which PPO never reads
# The stages before PPO: a PPO resume loads their adapters from the run directory as they are, so their settings
# matter only when this command runs those stages again. (reward_model.init, sft.*: earlier stages; ppo.num_generations,
# ppo.weight_decay, ppo.stop_token and lora.critic_init are guarded like every other key.)
EARLIER_STAGES = ("sft.", "reward_model.", "data.sft", "data.preferences", "data.eval_fraction")


class ResumeMismatchError(ConfigError):
    """ppo.resume with a recipe that would change the experiment the checkpoint belongs to."""


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "micro_batch":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


_HASHES: dict[tuple, str] = {}


def file_hash(source: str) -> str | None:
    """SHA-256 of a local file or saved-dataset directory (cached per size and mtime: checkpoints repeat it); None
    for a hub id, whose name is all we know without downloading it."""
    from ..data.tables import BUNDLED_DIR, BUNDLED_PREFIX

    if source.startswith(BUNDLED_PREFIX):
        found = [p for p in (BUNDLED_DIR / f"{source[len(BUNDLED_PREFIX):]}{s}" for s in (".jsonl", ".json"))
                 if p.is_file()]
        path = found[0] if found else None
    else:
        path = Path(source).expanduser()
    if path is None or not path.exists():
        return None
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    key = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if key not in _HASHES:
        digest = hashlib.sha256()
        for p in files:
            digest.update(p.read_bytes())
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def experiment(cfg: RecipeConfig) -> dict:
    """What a checkpoint records: every recipe key (dotted) and the hashes of the files the math reads."""
    settings = _flatten(to_dict(cfg))
    if cfg.data.prompts:
        settings["data.prompts (sha256)"] = file_hash(cfg.data.prompts)
    for spec in cfg.rewards.functions:
        target = str(spec).rpartition(":")[0]
        if target.endswith(".py"):
            settings[f"rewards.functions {spec} (sha256)"] = file_hash(target)
    return settings


def _short(value) -> str:
    text = repr(value)
    return text[:14] + "...'" if isinstance(value, str) and len(value) == 64 else text  # a hash: its start


def check_resume(saved: dict | None, cfg: RecipeConfig, stages: list[str], source: Path) -> list[str]:
    """Refuse (ResumeMismatchError, one line) when `cfg` changes the math of the experiment `saved` records;
    returns the changed keys it accepts, which it also logs."""
    if saved is None:
        log.warning("%s records no settings (written by an older version): resuming without checking the recipe",
                    source)
        return []
    current = experiment(cfg)
    earlier_reruns = bool({"sft", "reward"} & set(stages))
    changed = [k for k in sorted(set(saved) & set(current)) if saved[k] != current[k] and k != "ppo.resume"]
    allowed = [k for k in changed if k.startswith(NOT_MATH) or (not earlier_reruns and k.startswith(EARLIER_STAGES))]
    refused = [k for k in changed if k not in allowed]

    def diff(keys: list[str]) -> str:
        return ", ".join(f"{k} {_short(saved[k])} -> {_short(current[k])}" for k in keys)

    if refused:
        raise ResumeMismatchError(f"ppo.resume: the recipe changes the experiment of {source}: {diff(refused)}; "
                                  f"set these back to resume it, or start PPO over with --overwrite (without "
                                  f"ppo.resume)")
    if allowed:
        note = ("; with lr_scheduler_type=linear the learning rate now decays to 0 at the new total_steps"
                if "ppo.total_steps" in allowed and cfg.ppo.lr_scheduler_type == "linear" else "")
        log.warning("resume: accepted changed settings that do not change the math: %s%s", diff(allowed), note)
    return allowed
