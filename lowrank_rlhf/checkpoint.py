"""Checkpoints that are either whole or absent.

A checkpoint is written into a temporary sibling directory, finished with a manifest (every file's size and
SHA-256), and only then renamed into place; the previous checkpoint is removed after the rename. A crash, a kill -9
or a full disk at any moment leaves the previous checkpoint intact, and a damaged one is refused on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupted."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(root: Path) -> None:
    entries = {str(p.relative_to(root)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in _files(root)}
    (root / MANIFEST).write_text(json.dumps(entries, indent=1))


def verify(root: Path) -> None:
    """Raise CheckpointError naming the first file that is missing, truncated or altered."""
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{root}: no {MANIFEST}; the checkpoint is incomplete")
    try:
        entries = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{manifest}: unreadable manifest") from None
    for name, entry in entries.items():
        path = root / name
        if not path.is_file():
            raise CheckpointError(f"{root}: {name} is missing")
        if path.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"{root}: {name} has {path.stat().st_size} bytes, the manifest says {entry['bytes']}")
        if _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"{root}: {name} does not match its SHA-256 in the manifest (corrupted)")


def _fsync_tree(root: Path) -> None:
    for path in _files(root) + [root / MANIFEST]:
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())


def write_atomically(target: Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp_dir), add the manifest, then swap tmp_dir into `target`. On any error nothing changes."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        write_manifest(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def latest(target: Path) -> Path | None:
    """The checkpoint to resume from, also when a crash struck between the two renames above."""
    target = Path(target)
    if target.exists():  # whole, or damaged (e.g. its manifest deleted): verify() tells which, and refuses
        return target
    old = target.with_name(f".{target.name}.old")
    if (old / MANIFEST).is_file():
        return old
    return None
