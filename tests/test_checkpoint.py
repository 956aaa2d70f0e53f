"""checkpoint.write_atomically, the one writer of whole-or-absent directories (checkpoints, adapters, model cache),
in each of its modes. The PPO-level faults (full disk, kill -9) are in test_reliability.py."""

import hashlib
import json
import os
from pathlib import Path

import pytest

from lowrank_rlhf.run import checkpoint as ckpt

MODES = [pytest.param(dict(), id="checkpoint"),
         pytest.param(dict(manifest=False), id="adapter"),
         pytest.param(dict(manifest=False, replace_existing=False), id="model-cache")]


def snapshot(parent: Path) -> dict:
    """Every file and folder under parent (hidden ones included) with its SHA-256."""
    return {str(p.relative_to(parent)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(parent.rglob("*"))}


def writes(text: str):
    def write(tmp: Path) -> None:
        (tmp / "sub").mkdir()
        (tmp / "a.txt").write_text(text)
        (tmp / "sub" / "b.bin").write_bytes(text.encode() * 100)
    return write


class Boom(Exception):
    pass


def half_then_boom(tmp: Path) -> None:
    writes("new")(tmp)
    (tmp / "a.txt").write_text("par")  # part of a file, then the failure
    raise Boom


@pytest.mark.parametrize("options", MODES)
@pytest.mark.parametrize("previous", [True, False], ids=["over-previous", "fresh"])
def test_an_exception_in_the_writer_changes_nothing(tmp_path, options, previous):
    target = tmp_path / "out"
    if previous:
        ckpt.write_atomically(target, writes("old"), **options)
    before = snapshot(tmp_path)
    with pytest.raises(Boom):
        ckpt.write_atomically(target, half_then_boom, **options)
    assert snapshot(tmp_path) == before  # the previous directory byte-identical, no temp or .old dir left


@pytest.mark.parametrize("options", MODES[:2])
def test_a_failed_rename_puts_the_previous_directory_back(tmp_path, monkeypatch, options):
    target = tmp_path / "out"
    ckpt.write_atomically(target, writes("old"), **options)
    before = snapshot(tmp_path)
    real = os.replace

    def refuse_the_new_one(src, dst):
        if ".tmp-" in str(src):
            raise OSError("rename failed")
        real(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", refuse_the_new_one)
    with pytest.raises(OSError, match="rename failed"):
        ckpt.write_atomically(target, writes("new"), **options)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("options", MODES[:2])
def test_replacing_swaps_in_the_new_directory_and_leaves_nothing_else(tmp_path, options):
    target = tmp_path / "out"
    ckpt.write_atomically(target, writes("old"), **options)
    ckpt.write_atomically(target, writes("new"), **options)
    assert (target / "a.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_without_replacing_an_existing_directory_wins(tmp_path):
    target = tmp_path / "out"
    ckpt.write_atomically(target, writes("theirs"), manifest=False, replace_existing=False)
    ckpt.write_atomically(target, writes("ours"), manifest=False, replace_existing=False)
    assert (target / "a.txt").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_without_replacing_losing_the_race_keeps_the_winner(tmp_path, monkeypatch):
    target = tmp_path / "out"
    real = os.rename

    def another_process_renames_first(src, dst):  # between our check for `target` and our rename
        monkeypatch.setattr(ckpt.os, "rename", real)
        ckpt.write_atomically(target, writes("theirs"), manifest=False, replace_existing=False)
        real(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", another_process_renames_first)
    ckpt.write_atomically(target, writes("ours"), manifest=False, replace_existing=False)
    assert (target / "a.txt").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_the_manifest_is_written_only_when_asked_and_verifies(tmp_path):
    ckpt.write_atomically(tmp_path / "with", writes("x"))
    ckpt.verify(tmp_path / "with")
    assert set(json.loads((tmp_path / "with" / ckpt.MANIFEST).read_text())) == {"a.txt", "sub/b.bin"}
    ckpt.write_atomically(tmp_path / "without", writes("x"), manifest=False)
    assert sorted(p.name for p in (tmp_path / "without").iterdir()) == ["a.txt", "sub"]
