"""SFT, reward model and DPO stop and resume like the RL loop: a signal finishes the step, saves a checkpoint and
ends with advice naming the stage's resume key; `<section>.resume=true` continues to the very adapter an
uninterrupted run writes; a checkpoint cut short is skipped, a changed recipe refused, an unfinished stage kept."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowrank_rlhf.config import ConfigError, load_recipe
from lowrank_rlhf.pipeline import check_run_dir, run_stages
from lowrank_rlhf.run.checkpoint import MANIFEST, CheckpointError
from lowrank_rlhf.run.directory import RunDirError
from lowrank_rlhf.run.signals import Interrupted
from lowrank_rlhf.stages import checkpoints

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny-cpu.yaml")
STEPS = ["sft.max_steps=6", "reward_model.max_steps=6", "dpo.max_steps=6", "data.max_samples=24"]
ADAPTER = {"sft": "sft", "reward": "reward", "dpo": "policy"}

pytestmark = pytest.mark.usefixtures("offline_single_thread")  # conftest: offline, one thread


def recipe(*overrides):
    return load_recipe(TINY, [*STEPS, *overrides])


def adapter(run: Path, stage: str) -> dict:
    return load_file(run / ADAPTER[stage] / "adapter_model.safetensors")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and bool(a) and all(torch.equal(a[k], b[k]) for k in a)


def earlier_stages(stage: str) -> list[str]:
    return {"sft": [], "reward": ["sft"], "dpo": ["sft"]}[stage]


def signal_at_step(monkeypatch, step: int, signum=signal.SIGTERM):
    """A real signal to this process at the end of optimizer step `step` (as `timeout` or Colab would send)."""
    original = checkpoints.StopOnSignal.on_step_end

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == step and not self.signum:
            os.kill(os.getpid(), signum)
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(checkpoints.StopOnSignal, "on_step_end", on_step_end)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "reward", "dpo"])
def test_a_signal_mid_stage_saves_and_the_resume_reaches_the_uninterrupted_adapter(tmp_path, monkeypatch, stage):
    extra = ["dpo.enabled=true"] if stage == "dpo" else []
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    for run in (straight, stopped):
        if earlier_stages(stage):
            run_stages(recipe(*extra), earlier_stages(stage), run)
    run_stages(recipe(*extra), [stage], straight)

    signal_at_step(monkeypatch, 3)
    with pytest.raises(Interrupted) as stop:
        run_stages(recipe(*extra), [stage], stopped)
    monkeypatch.undo()
    section = checkpoints.SECTIONS[stage]
    assert stop.value.signum == signal.SIGTERM
    assert f"{section}.resume=true" in stop.value.advice and "at step 3" in stop.value.advice
    folder = checkpoints.checkpoint_dir(stopped, stage)
    assert (folder / "checkpoint-3" / MANIFEST).is_file()
    assert not (stopped / ADAPTER[stage]).exists()

    with pytest.raises(RunDirError, match=f"unfinished {stage} stage .*{section}.resume=true"):
        run_stages(recipe(*extra), [stage], stopped)  # the same command without resume keeps the checkpoint
    assert (folder / "checkpoint-3").is_dir()

    run_stages(recipe(*extra, f"{section}.resume=true"), [stage], stopped)
    assert same(adapter(straight, stage), adapter(stopped, stage))
    assert not folder.exists()  # a finished stage drops its checkpoints


def test_resume_skips_a_checkpoint_cut_short_and_refuses_a_changed_recipe(tmp_path, monkeypatch, caplog):
    run = tmp_path / "run"
    signal_at_step(monkeypatch, 2)
    with pytest.raises(Interrupted):
        run_stages(recipe("sft.save_steps=1"), ["sft"], run)
    monkeypatch.undo()
    folder = checkpoints.checkpoint_dir(run, "sft")
    assert sorted(p.name for p in folder.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    weights = folder / "checkpoint-2" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a kill -9 while it was written
    assert checkpoints.resume_point(recipe("sft.resume=true"), run, "sft") == folder / "checkpoint-1"
    assert "skipping checkpoint-2" in caplog.text

    with pytest.raises(ConfigError, match=r"sft.resume: the recipe changes the experiment .*sft.learning_rate"):
        checkpoints.resume_point(recipe("sft.resume=true", "sft.learning_rate=0.5"), run, "sft")
    checkpoints.resume_point(recipe("sft.resume=true", "sft.save_steps=3"), run, "sft")  # saving is not math

    (folder / "checkpoint-1" / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="no checkpoint in .* is complete"):
        checkpoints.resume_point(recipe("sft.resume=true"), run, "sft")
    with pytest.raises(CheckpointError, match="holds no checkpoint to resume"):
        checkpoints.resume_point(recipe("sft.resume=true"), tmp_path / "empty", "sft")


def test_overwrite_starts_an_unfinished_stage_over(tmp_path, monkeypatch):
    run = tmp_path / "run"
    signal_at_step(monkeypatch, 2)
    with pytest.raises(Interrupted):
        run_stages(recipe(), ["sft"], run)
    monkeypatch.undo()
    check_run_dir(recipe(), run, ["sft"], overwrite=True)  # allowed
    run_stages(recipe(), ["sft"], run, overwrite=True)
    assert (run / "sft" / "adapter_model.safetensors").is_file()
    assert not checkpoints.checkpoint_dir(run, "sft").exists()


def cli(run: Path, *overrides: str) -> subprocess.Popen:
    """`lowrank-rlhf train --stage sft` in a child process whose optimizer steps each take 0.3 s longer (a sleep
    that changes no number), so that a signal can arrive mid-stage."""
    code = ("import sys, time\nimport transformers\n"
            "step = transformers.Trainer.training_step\n"
            "def slow(self, *a, **k):\n    time.sleep(0.3)\n    return step(self, *a, **k)\n"
            "transformers.Trainer.training_step = slow\n"
            "from lowrank_rlhf.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    args = ["train", TINY, "--stage", "sft", "--output-dir", str(run), "sft.max_steps=12", "data.max_samples=24",
            "sft.save_steps=2", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_checkpoint(run: Path, step: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while not (checkpoints.checkpoint_dir(run, "sft") / f"checkpoint-{step}" / MANIFEST).is_file():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "no checkpoint in 300 s"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGKILL, -signal.SIGKILL)])
def test_the_cli_stopped_or_killed_mid_sft_resumes_to_the_same_adapter(tmp_path, signum, code):
    straight = cli(tmp_path / "straight")
    assert straight.wait(600) == 0, straight.stdout.read()[-3000:]

    run = tmp_path / "run"
    proc = cli(run)
    wait_for_checkpoint(run, 4, proc)
    proc.send_signal(signum)
    assert proc.wait(300) == code
    output = proc.stdout.read()
    if signum == signal.SIGTERM:
        assert output.strip().splitlines()[-1].startswith("stopped by SIGTERM: the sft stage saved its checkpoint")
        assert output.strip().endswith("rerun the same command with sft.resume=true to continue it")
        assert "Traceback" not in output
    assert not (run / "sft").exists()

    resumed = cli(run, "sft.resume=true")
    assert resumed.wait(600) == 0, resumed.stdout.read()[-3000:]
    assert same(load_file(tmp_path / "straight" / "sft" / "adapter_model.safetensors"),
                load_file(run / "sft" / "adapter_model.safetensors"))
