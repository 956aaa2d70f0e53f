"""`lowrank-rlhf compare`: paired statistics of RL vs SFT over seeds, on hand-made scores and on real tiny runs."""

import json
import shutil

import numpy as np
import pytest

from conftest import error_line
from lowrank_rlhf.cli import main
from lowrank_rlhf.commands import paired_stats


def test_a_clear_gain_has_an_interval_above_zero_and_small_p_values():
    rng = np.random.default_rng(0)
    sft = (rng.random(300) < 0.6).astype(float)
    # each seed fixes 40% of SFT's mistakes and breaks 2% of its right answers: about +14 points
    rl = np.stack([np.where(sft == 1, rng.random(300) > 0.02, rng.random(300) < 0.4) for _ in range(5)]).astype(float)
    result = paired_stats.compare_scores(sft, rl)
    assert result["seeds_better"] == 5 and result["sign_test_p"] == pytest.approx(2 / 32)
    assert 0.08 < result["mean_gain"] < 0.2 and result["ci95"][0] > 0.05
    assert all(s["mcnemar_p"] < 0.001 and s["ci95"][0] > 0 for s in result["seeds"])


def test_luck_alone_gives_an_interval_around_zero():
    rng = np.random.default_rng(1)
    sft = (rng.random(300) < 0.6).astype(float)
    rl = np.stack([np.where(rng.random(300) < 0.1, 1 - sft, sft) for _ in range(5)])  # flips 10%, either way
    result = paired_stats.compare_scores(sft, rl)
    low, high = result["ci95"]
    assert low < 0 < high and abs(result["mean_gain"]) < 0.03


def test_seed_luck_widens_the_interval_beyond_what_the_prompts_alone_give():
    """Two seeds far apart: the prompts-only interval of each is narrow, but the mean's must cover both stories."""
    sft = np.zeros(400)
    rl = np.stack([np.r_[np.ones(120), np.zeros(280)], np.r_[np.ones(8), np.zeros(392)]])  # +30 and +2 points
    result = paired_stats.compare_scores(sft, rl)
    low, high = result["ci95"]
    assert low <= 0.03 and high >= 0.29  # resampling seeds can draw (seed 2, seed 2) or (seed 1, seed 1)
    assert result["seeds"][0]["ci95"][0] > 0.25  # seed 1 alone looks certain


def test_every_seed_must_answer_the_same_prompts():
    with pytest.raises(ValueError, match="same 3 prompts"):
        paired_stats.compare_scores(np.ones(3), np.ones((2, 4)))


def fake_run(path, sft_bytes=b"sft", answers=("yes", "no")):
    """A finished run as compare reads it: sft and policy adapters, and an eval report with the answers."""
    for role, content in (("sft", sft_bytes), ("policy", b"policy")):
        (path / role).mkdir(parents=True)
        (path / role / "adapter_config.json").write_text("{}")
        (path / role / "adapter_model.safetensors").write_bytes(content)
    return path


def test_compare_refuses_runs_from_different_sft_adapters_and_a_file_it_did_not_write(tmp_path, capsys):
    a, b = fake_run(tmp_path / "a"), fake_run(tmp_path / "b", sft_bytes=b"other")
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "out")]) == 2
    assert "the runs' RUN/sft adapters differ" in error_line(capsys.readouterr().err)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "compare.md").write_text("my notes")
    shutil.rmtree(b)
    assert main(["compare", str(a), "--out", str(tmp_path / "out")]) == 2
    assert "compare.md exists and was not written by lowrank-rlhf compare" in error_line(capsys.readouterr().err)
    assert (tmp_path / "out" / "compare.md").read_text() == "my notes"
    assert main(["compare", str(tmp_path / "none"), "--out", str(tmp_path / "o2")]) == 2
    assert "has no trained policy" in error_line(capsys.readouterr().err)


def test_compare_trains_each_seed_from_one_sft_and_reports_the_paired_gain(tmp_path, capsys):
    """The command end to end on tiny-llama: sft + reward once, the RL stage for two seeds from copies of them,
    each evaluated on 8 held-out headlines, then the statistics. A second call reuses the finished seeds."""
    from pathlib import Path

    tiny = str(Path(__file__).resolve().parents[1] / "recipes" / "tiny-cpu.yaml")
    shared, out = tmp_path / "shared", tmp_path / "cmp"
    assert main(["train", tiny, "--stage", "sft", "--output-dir", str(shared)]) == 0
    assert main(["train", tiny, "--stage", "reward", "--output-dir", str(shared)]) == 0
    args = ["compare", "--out", str(out), "--held-out", "bundled:clickbait_validation", "--reward",
            "lowrank_rlhf.rewards:clickbait_accuracy", "--train-from", str(shared), "--recipe", tiny,
            "--seeds", "0", "1", "--set", "ppo.total_steps=1", "--set", "data.max_samples=8",
            "--set", "ppo.eval_steps=1", "--set", "data.eval_prompts=bundled:clickbait_prompts"]
    assert main(args) == 0
    result = json.loads((out / "compare.json").read_text())
    assert result["labels"] == ["seed-0", "seed-1"] and result["prompts"] == 80
    assert len(result["seeds"]) == 2 and result["ci95"][0] <= result["mean_gain"] <= result["ci95"][1]
    assert (out / "compare.png").stat().st_size > 0 and "RL, mean" in (out / "compare.md").read_text()
    assert (out / "seed-1" / "recipe.yaml").read_text().count("seed: 1") == 1
    stamp = (out / "seed-0" / "policy" / "adapter_model.safetensors").stat().st_mtime_ns
    assert main(args + ["--policy", "best"]) == 0  # finished seeds are kept, not retrained
    assert (out / "seed-0" / "policy" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    best = json.loads((out / "compare.json").read_text())
    assert best["policy"] == "best" and all(s["policy"].startswith("best (step ") for s in best["seeds"])


def test_best_is_refused_when_it_was_chosen_on_the_held_out_set():
    from lowrank_rlhf.commands.compare import policy_label
    from lowrank_rlhf.config import ConfigError

    report = {"run": "R", "held_out": "bundled:clickbait_heldout", "results": {"policy": {}, "best (step 6)": {}},
              "best": {"chosen_on": "bundled:clickbait_validation"}}
    assert policy_label(report, "best") == "best (step 6)" and policy_label(report, "final") == "policy"
    report["best"]["chosen_on"] = "bundled:clickbait_heldout"
    with pytest.raises(ConfigError, match="chosen on bundled:clickbait_heldout, the held-out set itself"):
        policy_label(report, "best")
