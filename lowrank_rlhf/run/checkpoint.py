"""Directories that are either whole or absent: checkpoints, adapters, the model cache.

`write_atomically` writes into a temporary sibling directory, optionally finishes it with a manifest (every file's
size and SHA-256), fsyncs it, and only then renames it into place; a previous directory is moved aside first and
removed after the rename. A crash, a kill -9 or a full disk at any moment leaves the previous directory intact and
no half-written target, and a damaged checkpoint is refused on load (`verify`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

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
    # Without this the rename can reach the disk before the data: a power cut would leave a whole-looking directory
    # of empty or truncated files.
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())


def write_atomically(target: Path, write: Callable[[Path], None], *, manifest: bool = True,
                     replace_existing: bool = True) -> Path:
    """Call write(tmp_dir), then rename tmp_dir to `target`. On any error nothing changes and tmp_dir is removed.

    manifest: add manifest.json so that `verify` can later refuse a truncated or altered copy (checkpoints); off for
        directories that others read as they are (PEFT adapters, the model cache).
    replace_existing: swap out an existing `target` for the new one; when False an existing `target` is kept and
        the new copy discarded (a cache entry that another process finished first).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        if manifest:
            write_manifest(tmp)
        _fsync_tree(tmp)
        if replace_existing:
            _swap_in(tmp, target)
        else:
            _move_in_unless_present(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _swap_in(tmp: Path, target: Path) -> None:
    """target -> .target.old, tmp -> target, drop .old. Should a crash strike between the two renames, .old is the
    previous directory, whole (`latest` resumes a checkpoint from it)."""
    old = target.with_name(f".{target.name}.old")
    moved_aside = False
    if target.exists():
        if old.exists():  # left by an earlier crash; `target` is newer
            shutil.rmtree(old)
        os.replace(target, old)
        moved_aside = True
    try:
        os.replace(tmp, target)
    except BaseException:
        if moved_aside and not target.exists():  # put the previous directory back where it was
            os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _move_in_unless_present(tmp: Path, target: Path) -> None:
    if target.exists():  # another process finished first; keep theirs
        shutil.rmtree(tmp)
        return
    try:
        os.rename(tmp, target)
    except OSError:
        if not target.exists():
            raise
        shutil.rmtree(tmp)  # another process renamed theirs in between (a directory cannot replace a non-empty one)


def latest(target: Path) -> Path | None:
    """The checkpoint to resume from, also when a crash struck between the two renames above."""
    target = Path(target)
    if target.exists():  # whole, or damaged (e.g. its manifest deleted): verify() tells which, and refuses
        return target
    old = target.with_name(f".{target.name}.old")
    if (old / MANIFEST).is_file():
        return old
    return None


def verify_adapter(directory: Path) -> bool:
    """Check an adapter directory (RUN/sft, RUN/policy...) before anything loads or copies it. Sealed (it has our
    manifest): every file must match it. Unsealed (written before adapters carried manifests): its safetensors
    files must at least open. Returns whether it was sealed; raises CheckpointError in one line naming the file
    and what to do."""
    directory = Path(directory)
    advice = (f"retrain that stage (--overwrite), or restore {directory} from a copy; "
              f"`lowrank-rlhf verify {directory.parent}` checks the whole run")
    if (directory / MANIFEST).is_file():
        try:
            verify(directory)
        except CheckpointError as err:
            raise CheckpointError(f"{err}; {advice}") from None
        return True
    from safetensors import safe_open

    for path in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():
                    fh.get_slice(key)
        except Exception as err:  # safetensors raises its own error types for every kind of damage
            raise CheckpointError(f"{path}: unreadable ({str(err).splitlines()[0][:80]}); {advice}") from None
    return False


def seal(directory: Path) -> None:
    """Give an unsealed adapter directory its manifest (`lowrank-rlhf verify RUN --seal`), after it opened."""
    verify_adapter(directory)
    write_manifest(directory)
