"""Every adapter and head the project writes carries its SHA-256 (the directory's manifest.json); what loads or
copies one checks it first, and `lowrank-rlhf verify RUN` says what is sound."""

import json
import shutil
from pathlib import Path

import pytest

from conftest import error_line
from lowrank_rlhf.cli import main
from lowrank_rlhf.config import load_recipe
from lowrank_rlhf.pipeline import run_stages
from lowrank_rlhf.run.checkpoint import MANIFEST, CheckpointError

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny-cpu.yaml")

pytestmark = pytest.mark.usefixtures("offline_single_thread")  # conftest: offline, one thread


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("integrity") / "run"
    run_stages(load_recipe(TINY), ["sft", "reward", "ppo"], run)
    return run


@pytest.fixture
def run(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def test_every_adapter_and_head_is_listed_with_its_sha256(finished_run):
    for role in ("sft", "reward", "policy"):
        entries = json.loads((finished_run / role / MANIFEST).read_text())
        assert "adapter_model.safetensors" in entries and "adapter_config.json" in entries
        assert all(len(e["sha256"]) == 64 and e["bytes"] > 0 for e in entries.values())
    assert "reward_head.safetensors" in json.loads((finished_run / "reward" / MANIFEST).read_text())


def test_verify_says_a_sound_run_is_sound(finished_run, capsys):
    assert main(["verify", str(finished_run)]) == 0
    out = capsys.readouterr().out
    assert "sound     policy:" in out and "DAMAGED" not in out and out.strip().endswith("sound")


@pytest.mark.parametrize("damage", ["truncated", "one byte changed"])
def test_a_damaged_policy_is_refused_by_generate_export_and_verify(run, tmp_path, capsys, damage):
    weights = run / "policy" / "adapter_model.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(blob[:100] if damage == "truncated" else blob[:-1] + bytes([blob[-1] ^ 1]))

    assert main(["generate", str(run), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "policy" in line and "adapter_model.safetensors" in line and "retrain that stage" in line

    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 2
    assert "adapter_model.safetensors" in error_line(capsys.readouterr().err)
    assert not out.exists()

    assert main(["verify", str(run)]) == 1
    report = capsys.readouterr().out
    assert "DAMAGED   policy:" in report and "sound     sft:" in report


def test_a_later_stage_refuses_a_damaged_sft_adapter(run):
    (run / "sft" / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(CheckpointError, match=r"sft.*adapter_model.safetensors"):
        run_stages(load_recipe(TINY, ["reward_model.init=sft"]), ["reward"], run, overwrite=True)


def test_an_adapter_from_before_manifests_loads_is_refused_by_export_until_sealed(run, tmp_path, capsys):
    (run / "policy" / MANIFEST).unlink()
    assert main(["generate", str(run), "--prompt", "hi", "--max-new-tokens", "2"]) == 0  # it opens: it is used
    capsys.readouterr()
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 2
    assert "verify" in error_line(capsys.readouterr().err) and not out.exists()
    assert main(["verify", str(run)]) == 1
    assert "unsealed  policy:" in capsys.readouterr().out
    assert main(["verify", str(run), "--seal"]) == 0
    assert main(["export", str(run), "--out", str(out)]) == 0
    exported = (out / "adapter_model.safetensors").read_bytes()
    assert exported == (run / "policy" / "adapter_model.safetensors").read_bytes()


def test_an_unreadable_adapter_without_a_manifest_is_refused_in_one_line(run, capsys):
    (run / "policy" / MANIFEST).unlink()
    weights = run / "policy" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["generate", str(run), "--prompt", "hi"]) == 2
    assert "unreadable" in error_line(capsys.readouterr().err)
    assert main(["verify", str(run), "--seal"]) == 1  # never seals a damaged file
    assert not (run / "policy" / MANIFEST).exists()


def test_verify_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 2
    assert str(tmp_path) in error_line(capsys.readouterr().err)
