"""Which files in a directory are ours: a run (or an export) writes only into an empty directory or one it wrote.

A run once overwrote a user's own README.md and recipe.yaml (DESIGN.md 3b). So every directory we write into lists
the names we wrote at its top level in OWNED_FILE, and `check_writable` refuses a directory holding anything else,
before anything is written, naming the first such entry. `--overwrite` then only ever replaces listed names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from .metadata import META_FILE

OWNED_FILE = ".lowrank_rlhf-files.json"
LOCK_FILE = ".lowrank_rlhf.lock"
EVAL_MARKER = "lowrank_rlhf eval"  # evaluation.py writes it near the top of every RUN/eval-*.json
# Everything a run may write at the top of its directory: the stages' outputs, PEFT's model card (README.md, written
# by save_pretrained beside the adapters), the PPO loop's files, the quickstart's report and the trackers' folders.
RUN_FILES = ("recipe.yaml", META_FILE, "README.md", "sft", "reward", "policy", "value", "best", "checkpoint",
             "checkpoint-sft", "checkpoint-reward", "checkpoint-dpo", "feedback",
             "metrics.jsonl", "tensorboard", "wandb", "report.json", "curves.png", OWNED_FILE, LOCK_FILE)


class RunDirError(ValueError):
    """The output directory holds files this command did not write, or results it would overwrite."""


def _transient(name: str) -> bool:
    """Scratch entries of our atomic writes (.checkpoint.tmp-*, .checkpoint.old) and TRL's scratch folders
    (.sft-*, .reward-*, .dpo-*): a kill -9 can leave them behind, and they are ours to replace."""
    return name.startswith(".") and (".tmp-" in name or name.endswith(".old") or
                                      name.startswith((".sft-", ".reward-", ".dpo-")))


def _eval_report(entry: Path) -> bool:
    """RUN/eval-<task>.json written by `lowrank-rlhf eval` (its first line names it: evaluation.MARKER), which does
    not list it in OWNED_FILE: without this a run that was evaluated could not be trained further."""
    if not (entry.name.startswith("eval-") and entry.suffix == ".json" and entry.is_file()):
        return False
    with open(entry, errors="replace") as f:
        return EVAL_MARKER in f.read(200)


def owned_names(directory: Path) -> set[str]:
    """The top-level names we wrote in `directory` (empty for a directory that is not ours)."""
    path = directory / OWNED_FILE
    if path.is_file():
        try:
            return set(json.loads(path.read_text()).get("files", []))
        except (json.JSONDecodeError, AttributeError):
            raise RunDirError(f"{path}: unreadable list of the files lowrank_rlhf wrote; restore it, or choose "
                              f"another directory") from None
    if (directory / META_FILE).is_file():  # a run directory written before OWNED_FILE existed
        return set(RUN_FILES)
    return set()


def check_writable(directory: Path, option: str) -> None:
    """Refuse `directory` unless it is absent, empty, or holds only entries we wrote (OWNED_FILE)."""
    directory = Path(directory)
    if not directory.exists():
        return
    if not directory.is_dir():
        raise RunDirError(f"{directory} is a file, not a directory; choose another {option}")
    owned = owned_names(directory)
    for entry in sorted(directory.iterdir()):
        if entry.name in owned or (owned and (_transient(entry.name) or _eval_report(entry))):
            continue
        raise RunDirError(f"{directory} holds {entry.name}, which lowrank_rlhf did not write; it writes only into an "
                          f"empty directory or one of its own (--overwrite replaces only files it wrote): move "
                          f"{entry.name} away or choose another {option}")


def claim(directory: Path, names: Iterable[str]) -> None:
    """Add `names` to the directory's OWNED_FILE, before writing them: a kill -9 halfway still leaves them ours.
    Written to a temporary file and renamed, so a crash never leaves a half-written list."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = sorted(owned_names(directory) | set(names) | {OWNED_FILE})
    tmp = directory / f"{OWNED_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"written_by": "lowrank_rlhf", "files": files}, indent=1) + "\n")
    os.replace(tmp, directory / OWNED_FILE)
