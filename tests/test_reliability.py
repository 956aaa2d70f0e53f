"""Reliability: bad input, faults and safe files, each case proven here or in the test that docs/reliability.md
names for it. The table in docs/reliability.md is checked against the tests at the end of this file."""

import ast
import errno
import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import adapter_weights, assert_same, make_trainer, recipe

from conftest import error_line
from lowrank_rlhf.cli import main
from lowrank_rlhf.config import ConfigError, ModelConfig, load_recipe
from lowrank_rlhf.models import loading as models
from lowrank_rlhf.models.builtin import tiny_llama_config, tiny_tokenizer
from lowrank_rlhf.pipeline import RunDirError, check_run_dir
from lowrank_rlhf.run import checkpoint as ckpt
from lowrank_rlhf.run import lock as run_lock

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny-cpu.yaml")
DOC = ROOT / "docs" / "reliability.md"
# The PPO stage alone: no reward model, a Python reward function instead (so no SFT or reward stage is needed).
PPO_ONLY = ["rewards.learned_weight=0", "rewards.functions=[lowrank_rlhf.rewards:brevity]"]
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}


# ------------------------------------------------------------------------------------------------------- helpers
def snapshot(root: Path) -> dict:
    """Every file and folder under root with its SHA-256: equal snapshots = an untouched directory."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def train(run: Path, *overrides: str) -> int:
    """`lowrank-rlhf train recipes/tiny-cpu.yaml --stage ppo --output-dir RUN ...` in this process."""
    return main(["train", TINY, "--stage", "ppo", "--output-dir", str(run), *PPO_ONLY, *overrides])


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    """A finished PPO run (2 steps, a checkpoint after each) that the bad-input tests try to damage."""
    run = tmp_path_factory.mktemp("reliability") / "run"
    assert train(run, "ppo.save_steps=1") == 0
    return run


@pytest.fixture
def run_copy(ppo_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ppo_run, run)
    return run


def save_config(path: Path, config) -> str:
    config.save_pretrained(path)
    return str(path)


def gpt2_dir(tmp: Path) -> str:
    from transformers import GPT2Config

    return save_config(tmp / "gpt2", GPT2Config(n_layer=1, n_embd=8, n_head=2))


def other_llama_dir(tmp: Path) -> str:
    """A LLaMA config with 3 layers where the run's adapters were trained on 2."""
    config = tiny_llama_config(len(tiny_tokenizer()))
    config.num_hidden_layers = 3
    return save_config(tmp / "other-llama", config)


def rows_file(tmp: Path, name: str, text: str) -> str:
    (tmp / name).write_text(text)
    return str(tmp / name)


# ---------------------------------------------------------------------------------------------- 1. bad input
NO_PROMPT_COLUMN = '{"question": "Is the sky blue?", "label": "yes"}\n'
BAD_INPUTS = [
    pytest.param(lambda t: ["ppo.kl_cof=0.1"], "ppo.kl_cof: unknown key; did you mean 'kl_coef'?",
                 id="unknown-key"),
    pytest.param(lambda t: ["ppo.total_steps=many"], "ppo.total_steps: expected an integer, got 'many'",
                 id="wrong-type"),
    pytest.param(lambda t: ["ppo.gamma=1.5"], "ppo.gamma: 1.5 is out of range; allowed range: [0.0, 1.0]",
                 id="out-of-range"),
    pytest.param(lambda t: ["ppo.kl_estimator=k2"], "ppo.kl_estimator: 'k2' is not allowed; allowed values: k1, k3",
                 id="not-an-allowed-value"),
    pytest.param(lambda t: [f"data.prompts={t}/missing.jsonl"], "data.prompts: file not found:",
                 id="missing-dataset-file"),
    pytest.param(lambda t: [f"data.prompts={rows_file(t, 'q.jsonl', NO_PROMPT_COLUMN)}"],
                 "data.prompts: missing column 'prompt' in", id="missing-columns"),  # + columns found, below
    pytest.param(lambda t: [f"data.prompts={rows_file(t, 'empty.jsonl', '')}"], "has no rows", id="empty-dataset"),
    pytest.param(lambda t: ["data.long_prompts=error", "data.max_prompt_length=8"],
                 "prompts are longer than data.max_prompt_length=8 tokens", id="prompt-too-long"),
    pytest.param(lambda t: [f"model.name={gpt2_dir(t)}"],
                 "is a 'gpt2' model; supported LLaMA-family types: llama, mistral, qwen2, qwen3", id="not-llama"),
    pytest.param(lambda t: ["model.name=./no-such-model"], "model.name: cannot read the config of './no-such-model'",
                 id="no-such-model"),
    pytest.param(lambda t: ["memory.budget=1KiB"], "memory budget 1.00 KiB is below the static floor 489.70 KiB",
                 id="budget-below-floor"),
    pytest.param(lambda t: ["rewards.functions=[no_such_module:score]"],
                 "rewards.functions: cannot import module 'no_such_module'", id="reward-function-import"),
    pytest.param(lambda t: [f"model.name={other_llama_dir(t)}", "ppo.resume=true"],
                 "were trained on base 'tiny-llama' (llama, 2 layers, hidden 64, vocab 260) but the loaded base is",
                 id="adapters-do-not-match-base"),
]


@pytest.mark.parametrize("overrides, message", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_and_leaves_the_run_untouched(run_copy, tmp_path, capsys, overrides, message):
    # --overwrite is the hard case: before the fix, a typo deleted the old PPO results, then failed
    before = snapshot(run_copy)
    code = train(run_copy, "--overwrite", *overrides(tmp_path))
    err = error_line(capsys.readouterr().err)
    assert code == 2 and message in err, err
    if "missing column" in message:
        assert err.endswith("columns found: question, label"), err
    assert snapshot(run_copy) == before


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'kl_coef'"):
        main(["--debug", "train", TINY, "--output-dir", str(tmp_path / "run"), "ppo.kl_cof=0.1"])


def test_long_prompts_are_truncated_with_a_warning_by_default(tmp_path):
    with pytest.warns(UserWarning, match=r"16 of 16 prompts were longer than data.max_prompt_length=32 tokens "
                                         r"\(longest: \d+\) and were truncated from the left"):
        assert train(tmp_path / "run", "data.max_prompt_length=32", "ppo.total_steps=1") == 0


def test_tokenizer_without_pad_token_uses_eos_and_says_so(tiny_path, tmp_path, caplog):
    from transformers import AutoTokenizer

    model_dir = tmp_path / "no-pad-llama"
    shutil.copytree(tiny_path, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(model_dir)
    assert AutoTokenizer.from_pretrained(model_dir).pad_token is None
    with caplog.at_level(logging.WARNING, logger="lowrank_rlhf.models.loading"):
        assert train(tmp_path / "run", f"model.name={model_dir}", "ppo.total_steps=1") == 0
    assert f"tokenizer of {model_dir} has no pad token: using eos '</s>' as pad" in caplog.text
    assert models.load_tokenizer(str(model_dir)).pad_token == "</s>"


def test_existing_run_is_reused_only_with_overwrite_or_resume(ppo_run, tmp_path):
    cfg = load_recipe(TINY)
    with pytest.raises(RunDirError, match="already holds ppo results .*; pass --overwrite, set ppo.resume=true"):
        check_run_dir(cfg, ppo_run, ["ppo"], overwrite=False)
    check_run_dir(cfg, ppo_run, ["ppo"], overwrite=True)
    check_run_dir(load_recipe(TINY, ["ppo.resume=true"]), ppo_run, ["ppo"], overwrite=False)
    (tmp_path / "sft").mkdir()  # ppo.resume concerns PPO only: earlier stages still need --overwrite
    with pytest.raises(RunDirError, match=r"already holds sft results \(sft\); pass --overwrite, continue PPO with "
                                          r"--stage ppo ppo.resume=true, or choose another --output-dir"):
        check_run_dir(load_recipe(TINY, ["ppo.resume=true"]), tmp_path, ["sft", "reward", "ppo"], overwrite=False)
    check_run_dir(cfg, tmp_path, ["sft"], overwrite=True)


def test_a_directory_with_files_of_others_is_refused_and_untouched(tmp_path, capsys):
    users = tmp_path / "mine"
    users.mkdir()
    (users / "recipe.yaml").write_text("my own recipe\n")
    (users / "README.md").write_text("my notes\n")
    for extra in ([], ["--overwrite"]):  # --overwrite replaces only files the run wrote: never these
        assert train(users, *extra) == 2
        err = error_line(capsys.readouterr().err)
        assert err == (f"error: {users} holds README.md, which lowrank_rlhf did not write; it writes only into an "
                       f"empty directory or one of its own (--overwrite replaces only files it wrote): move README.md "
                       f"away or choose another --output-dir"), err
        assert sorted(p.name for p in users.iterdir()) == ["README.md", "recipe.yaml"]
        assert (users / "README.md").read_text() == "my notes\n"


def test_a_file_added_to_a_run_directory_is_never_overwritten(run_copy, capsys):
    (run_copy / "notes.txt").write_text("mine\n")
    before = snapshot(run_copy)
    assert train(run_copy, "--overwrite") == 2
    assert "holds notes.txt, which lowrank_rlhf did not write" in error_line(capsys.readouterr().err)
    assert snapshot(run_copy) == before
    (run_copy / "notes.txt").unlink()
    assert train(run_copy, "--overwrite", "ppo.total_steps=1") == 0  # its own files: replaced with --overwrite
    assert {".lowrank_rlhf-files.json", "recipe.yaml", "README.md", "policy"} <= {p.name for p in run_copy.iterdir()}


def test_export_writes_only_into_an_empty_directory_or_its_own_export(ppo_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine\n")
    assert main(["export", str(ppo_run), "--out", str(out), "--overwrite"]) == 2
    assert "holds keep.txt, which lowrank_rlhf did not write" in error_line(capsys.readouterr().err)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    assert main(["export", str(ppo_run), "--out", str(out)]) == 0  # an empty directory
    assert main(["export", str(ppo_run), "--out", str(out)]) == 2  # an earlier export: only with --overwrite
    assert error_line(capsys.readouterr().err) == (f"error: {out} already holds an export; pass --overwrite to replace "
                                                   f"it, or choose another --out")
    assert main(["export", str(ppo_run), "--out", str(out), "--overwrite"]) == 0
    assert (out / "adapter_config.json").is_file()


@pytest.mark.parametrize("overrides, message", [
    pytest.param(["ppo.kl_coef=0.1", "seed=3"], "ppo.kl_coef 0.05 -> 0.1, seed 0 -> 3", id="coefficient-and-seed"),
    pytest.param(["lora.r=8"], "lora.r 4 -> 8", id="lora-shape"),
    pytest.param(["model.quantization=8bit"], "model.quantization '4bit' -> '8bit'", id="quantization"),
    pytest.param(["ppo.num_generations=2"], "ppo.num_generations 1 -> 2", id="num-generations"),
    pytest.param(["EDIT_PROMPTS"], "data.prompts (sha256) '", id="data-file-edited"),
])
def test_a_resume_that_changes_the_math_is_refused_with_a_diff(tmp_path, capsys, overrides, message):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Is {w} a word?"}) + "\n" for w in ("sky", "tree", "sea", "sun")))
    run = tmp_path / "run"
    assert train(run, f"data.prompts={prompts}", "ppo.total_steps=1") == 0
    if overrides == ["EDIT_PROMPTS"]:
        prompts.write_text(prompts.read_text().replace("sky", "fog"))
        overrides = []
    before = snapshot(run)
    assert train(run, f"data.prompts={prompts}", "ppo.resume=true", "ppo.total_steps=2", *overrides) == 2
    err = error_line(capsys.readouterr().err)
    assert err.startswith(f"error: ppo.resume: the recipe changes the experiment of {run}/checkpoint: "), err
    assert message in err and err.endswith("; set these back to resume it, or start PPO over with --overwrite "
                                           "(without ppo.resume)"), err
    assert "total_steps" not in err  # allowed, so not part of the refusal
    assert snapshot(run) == before


def test_a_resume_accepts_logging_saving_and_step_changes_and_says_so(run_copy, caplog):
    with caplog.at_level(logging.WARNING, logger="lowrank_rlhf.run.resume_guard"):
        assert train(run_copy, "ppo.resume=true", "ppo.total_steps=3", "ppo.save_steps=0", "memory.budget=3GiB",
                     "ppo.logits_chunk_tokens=2") == 0
    assert ("resume: accepted changed settings that do not change the math: memory.budget '2GiB' -> '3GiB', "
            "ppo.logits_chunk_tokens 0 -> 2, ppo.save_steps 1 -> 0, ppo.total_steps 2 -> 3") in caplog.text


HANGING_REWARD = """
CALLS = 0


def hang(prompts, completions, **kwargs):
    global CALLS
    CALLS += 1
    while CALLS >= 2:  # the second call never returns, and a broad except does not save it
        try:
            sum(range(10_000))
        except Exception:
            pass
    return [1.0] * len(completions)
"""


def test_a_reward_function_that_hangs_stops_with_one_line_and_keeps_the_checkpoint(tmp_path, capsys):
    file = rows_file(tmp_path, "hanging_reward.py", HANGING_REWARD)
    run = tmp_path / "run"
    started = time.monotonic()
    code = main(["train", TINY, "--stage", "ppo", "--output-dir", str(run), "rewards.learned_weight=0",
                 f"rewards.functions=[{file}:hang]", "rewards.timeout_s=2", "ppo.save_steps=1", "ppo.total_steps=3"])
    err = error_line(capsys.readouterr().err)
    assert code == 2 and err == (f"error: reward function {file}:hang did not return within rewards.timeout_s=2 s; "
                                 f"make it faster, or raise rewards.timeout_s (null = no limit)"), err
    assert time.monotonic() - started < 120
    assert checkpoint_step(run) == 1  # step 1's checkpoint, intact (manifest verified)
    assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_reward_timeout_off_the_main_thread_uses_a_worker_thread():
    import threading

    from lowrank_rlhf.rewards import RewardFunctionError, bounded, call_reward_function

    def slow(prompts, completions):
        time.sleep(30)

    outcome = {}

    def call():
        try:
            call_reward_function(bounded(slow, "slow", 0.5), ["p"], ["c"], name="slow")
        except RewardFunctionError as err:
            outcome["error"] = str(err)

    worker = threading.Thread(target=call)
    started = time.monotonic()
    worker.start()
    worker.join(20)
    assert outcome["error"].startswith("reward function slow did not return within rewards.timeout_s=0.5 s")
    assert time.monotonic() - started < 10
    # the signature (which columns the function gets) survives the wrapper
    assert call_reward_function(bounded(lambda prompts, completions: [2.0], "f", 5), ["p"], ["c"], label=["x"]) == 2


BAD_ROWS = [
    pytest.param("prompts.jsonl", '{"prompt": "Is it?", "label": "yes"}\n{"prompt": "Or not?", "label": "no"\n', [],
                 "data.prompts: could not read {file} as jsonl: line 2 is not valid JSON (Expecting ',' delimiter, "
                 "column 36); fix or remove that line", id="bad-json-line"),
    pytest.param("prompts.jsonl", '{"prompt": "Is it?", "label": "yes"}\n\n{"label": "no"}\n', [],
                 "data.prompts: {file} row 1 (line 3) has no 'prompt'; every row needs one (columns: prompt, label)",
                 id="missing-column-in-a-row"),
    pytest.param("prompts.csv", "prompt,label\nIs it?,yes\n,no\n", [],
                 "data.prompts: {file} row 1 (line 3) has no 'prompt'; every row needs one (columns: prompt, label)",
                 id="empty-csv-cell"),
    pytest.param("prompts.jsonl", '{"prompt": "Is it?"}\n{"prompt": "   "}\n', [],
                 "data.prompts: {file} row 1 (line 2) has an empty prompt; give it text or remove the row",
                 id="empty-prompt"),
    pytest.param("prompts.jsonl", '{"prompt": "Short?"}\n{"prompt": "' + "long " * 20 + '"}\n',
                 ["data.long_prompts=error", "data.max_prompt_length=20"],
                 "data.prompts: 1 of 2 prompts are longer than data.max_prompt_length=20 tokens, the first in {file} "
                 "row 1 (", id="prompt-too-long-row"),
]


@pytest.mark.parametrize("name, text, overrides, message", BAD_ROWS)
def test_a_malformed_data_row_is_reported_with_the_file_and_row(tmp_path, capsys, name, text, overrides, message):
    file = rows_file(tmp_path, name, text)
    assert train(tmp_path / "run", f"data.prompts={file}", *overrides) == 2
    err = error_line(capsys.readouterr().err)
    assert err.startswith("error: " + message.format(file=file)), err
    assert not (tmp_path / "run").exists()


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))


DAMAGE = [
    pytest.param("policy/adapter_model.safetensors", truncate,
                 r"checkpoint: policy/adapter_model.safetensors has \d+ bytes, the manifest says \d+",
                 id="truncated-file"),
    pytest.param("trainer_state.pt", flip_a_byte,
                 r"checkpoint: trainer_state.pt does not match its SHA-256 in the manifest \(corrupted\)",
                 id="corrupted-file"),
    pytest.param("value/value_head.safetensors", Path.unlink, r"checkpoint: value/value_head.safetensors is missing",
                 id="missing-file"),
    pytest.param("manifest.json", Path.unlink, r"checkpoint: no manifest.json; the checkpoint is incomplete",
                 id="missing-manifest"),
    pytest.param("manifest.json", truncate, r"checkpoint/manifest.json: unreadable manifest",
                 id="truncated-manifest"),
]


@pytest.mark.parametrize("name, damage, message", DAMAGE)
def test_damaged_checkpoint_is_refused_on_resume(run_copy, capsys, name, damage, message):
    damage(run_copy / "checkpoint" / name)
    with pytest.raises(ckpt.CheckpointError):
        ckpt.verify(ckpt.latest(run_copy / "checkpoint"))
    before = snapshot(run_copy)
    assert train(run_copy, "ppo.resume=true", "ppo.total_steps=3") == 2
    err = error_line(capsys.readouterr().err)
    assert re.search(message, err), err
    assert err.endswith("; cannot resume from it: restore it, or start PPO over with --overwrite (without "
                        "ppo.resume)"), err
    assert snapshot(run_copy) == before


BAD_REWARDS = """
def short(prompts, completions, **kwargs):
    return [1.0]

def nan(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)
"""


@pytest.mark.parametrize("function, message", [
    pytest.param("short", "reward function {file}:short returned 1 scores for 4 completions; expected 4",
                 id="wrong-length"),
    pytest.param("nan", "reward function {file}:nan returned a non-finite score (nan) at index 0", id="nan"),
])
def test_reward_function_bad_output_stops_with_one_line(tmp_path, capsys, function, message):
    file = rows_file(tmp_path, "bad_rewards.py", BAD_REWARDS)
    code = main(["train", TINY, "--stage", "ppo", "--output-dir", str(tmp_path / "run"), "rewards.learned_weight=0",
                 f"rewards.functions=[{file}:{function}]"])
    err = error_line(capsys.readouterr().err)
    assert code == 2 and message.format(file=file) in err, err


# --------------------------------------------------------------------------------------------------- 2. faults
BLOCKING_REWARD = """
import os, time
from pathlib import Path
from lowrank_rlhf.rewards import brevity

CALLS = 0


def score(prompts, completions, **kwargs):
    \"\"\"brevity; on call BLOCK_AT_CALL it writes BLOCK_MARKER, then waits for BLOCK_RELEASE (or 300 s).\"\"\"
    global CALLS
    CALLS += 1
    if os.environ.get("BLOCK_AT_CALL") == str(CALLS):
        Path(os.environ["BLOCK_MARKER"]).write_text(str(CALLS))
        release, deadline = Path(os.environ.get("BLOCK_RELEASE", "/nonexistent")), time.time() + 300
        while not release.exists() and time.time() < deadline:
            time.sleep(0.02)
    return brevity(prompts, completions)
"""


def ppo_process(tmp_path: Path, run: Path, *overrides: str, block_at: int | None = None) -> subprocess.Popen:
    """`python -m lowrank_rlhf train ... --stage ppo` with a reward function that can stop in a given step."""
    reward = tmp_path / "blocking_reward.py"
    if not reward.exists():
        reward.write_text(BLOCKING_REWARD)
    env = dict(SUBPROCESS_ENV, BLOCK_MARKER=str(tmp_path / "blocked"), BLOCK_RELEASE=str(tmp_path / "release"))
    if block_at:
        env["BLOCK_AT_CALL"] = str(block_at)
    log = tmp_path / f"{run.name}-{time.monotonic_ns()}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lowrank_rlhf", "train", TINY, "--stage", "ppo",
                                 "--output-dir", str(run), "rewards.learned_weight=0",
                                 f"rewards.functions=[{reward}:score]", "ppo.total_steps=4", *overrides],
                                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def finish(proc: subprocess.Popen, timeout: float = 300) -> int:
    return proc.wait(timeout=timeout)


def log_of(proc: subprocess.Popen) -> str:
    return proc.log.read_text()


def wait_for(ready, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"exited with {proc.returncode} before {what}:\n{log_of(proc)[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def checkpoint_step(run: Path) -> int:
    source = ckpt.latest(run / "checkpoint")
    ckpt.verify(source)
    return json.loads((source / "trainer_state.json").read_text())["step"]


def metric_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


FINAL_FILES = ("policy/adapter_model.safetensors", "value/adapter_model.safetensors", "value/value_head.safetensors")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    """The uninterrupted run that the kill -9 and SIGTERM runs must reach, bit for bit, after their resume."""
    tmp = tmp_path_factory.mktemp("straight")
    straight = ppo_process(tmp, tmp / "straight", "ppo.save_steps=1")
    assert finish(straight) == 0, log_of(straight)[-3000:]
    return tmp / "straight"


def assert_same_final_adapters(straight: Path, resumed: Path) -> None:
    for name in FINAL_FILES:
        a, b = load_file(straight / name), load_file(resumed / name)
        assert a.keys() == b.keys() and a
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_kill_9_mid_ppo_then_resume_ends_with_the_same_adapters(tmp_path, straight_run):
    killed = ppo_process(tmp_path, tmp_path / "killed", "ppo.save_steps=1", block_at=3)
    wait_for((tmp_path / "blocked").exists, killed, "step 3")  # in step 3's scoring: step 2 checkpointed, logged
    assert checkpoint_step(tmp_path / "killed") == 2 and metric_steps(tmp_path / "killed") == [1, 2]
    killed.send_signal(signal.SIGKILL)
    assert finish(killed) == -signal.SIGKILL

    resumed = ppo_process(tmp_path, tmp_path / "killed", "ppo.save_steps=1", "ppo.resume=true")
    assert finish(resumed) == 0, log_of(resumed)[-3000:]
    assert "resumed from" in log_of(resumed) and "at step 2" in log_of(resumed)
    assert metric_steps(tmp_path / "killed") == [1, 2, 3, 4]
    assert_same_final_adapters(straight_run, tmp_path / "killed")


@pytest.mark.parametrize("algorithm", ["grpo", "rloo", "reinforce_pp"])
def test_kill_9_mid_critic_free_run_then_resume_ends_with_the_same_adapters(tmp_path, algorithm):
    """The critic-free loops keep the same promise; their checkpoint holds no value role to restore."""
    overrides = ("ppo.save_steps=1", f"ppo.algorithm={algorithm}", "ppo.num_generations=2", "ppo.beta=0.1")
    straight = ppo_process(tmp_path, tmp_path / "straight", *overrides)
    killed = ppo_process(tmp_path, tmp_path / "killed", *overrides, block_at=3)
    assert finish(straight) == 0, log_of(straight)[-3000:]
    wait_for((tmp_path / "blocked").exists, killed, "step 3")
    assert checkpoint_step(tmp_path / "killed") == 2 and metric_steps(tmp_path / "killed") == [1, 2]
    killed.send_signal(signal.SIGKILL)
    assert finish(killed) == -signal.SIGKILL

    resumed = ppo_process(tmp_path, tmp_path / "killed", *overrides, "ppo.resume=true")
    assert finish(resumed) == 0, log_of(resumed)[-3000:]
    assert "at step 2" in log_of(resumed) and metric_steps(tmp_path / "killed") == [1, 2, 3, 4]
    a, b = (load_file(run / "policy/adapter_model.safetensors") for run in (tmp_path / "straight", tmp_path / "killed"))
    assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a)
    assert not any("value" in p.name for p in (tmp_path / "killed").rglob("*"))


def test_sigint_writes_a_checkpoint_and_exits_130(tmp_path):
    proc = ppo_process(tmp_path, tmp_path / "run", block_at=2)  # save_steps=0: only the end and Ctrl-C save
    wait_for((tmp_path / "blocked").exists, proc, "step 2")
    proc.send_signal(signal.SIGINT)  # Ctrl-C while step 2's reward function runs
    wait_for(lambda: "Ctrl-C: finishing this step" in log_of(proc), proc, "the Ctrl-C message")
    (tmp_path / "release").touch()  # step 2 finishes, then the checkpoint, then exit
    assert finish(proc) == 130, log_of(proc)[-3000:]
    output = log_of(proc)
    assert output.strip().splitlines()[-1] == ("interrupted: the RL stage saved its checkpoint at step 2; rerun the "
                                               "same command with ppo.resume=true to continue it")
    assert "Traceback" not in output
    assert checkpoint_step(tmp_path / "run") == 2 and metric_steps(tmp_path / "run") == [1, 2]
    assert not (tmp_path / "run" / "policy").exists()  # final adapters are written only by a finished run


def test_sigterm_writes_a_checkpoint_exits_143_and_resumes_to_the_same_adapters(tmp_path, straight_run):
    proc = ppo_process(tmp_path, tmp_path / "run", "ppo.save_steps=1", block_at=3)
    wait_for((tmp_path / "blocked").exists, proc, "step 3")
    proc.send_signal(signal.SIGTERM)  # what `timeout`, Colab and job schedulers send, in step 3's reward function
    wait_for(lambda: "SIGTERM: finishing this step" in log_of(proc), proc, "the SIGTERM message")
    (tmp_path / "release").touch()
    assert finish(proc) == 143, log_of(proc)[-3000:]
    output = log_of(proc)
    assert output.strip().splitlines()[-1] == ("stopped by SIGTERM: the RL stage saved its checkpoint at step 3; "
                                               "rerun the same command with ppo.resume=true to continue it")
    assert "Traceback" not in output
    assert checkpoint_step(tmp_path / "run") == 3 and metric_steps(tmp_path / "run") == [1, 2, 3]
    assert not (tmp_path / "run" / run_lock.LOCK_FILE).exists()  # released on the way out

    resumed = ppo_process(tmp_path, tmp_path / "run", "ppo.save_steps=1", "ppo.resume=true")
    assert finish(resumed) == 0, log_of(resumed)[-3000:]
    assert "at step 3" in log_of(resumed) and metric_steps(tmp_path / "run") == [1, 2, 3, 4]
    assert_same_final_adapters(straight_run, tmp_path / "run")


def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(tmp_path, capsys, caplog):
    run = tmp_path / "run"
    first = ppo_process(tmp_path, run, block_at=1)
    try:
        wait_for((tmp_path / "blocked").exists, first, "step 1")
        before = snapshot(run)
        assert train(run, "--overwrite") == 2  # --overwrite too: a live writer is never overridden
        err = error_line(capsys.readouterr().err)
        assert err == (f"error: {run} is in use by process {first.pid} (.lowrank_rlhf.lock); wait for it to finish "
                       f"or stop it, or choose another --output-dir"), err
        assert snapshot(run) == before
    finally:
        first.kill()
        first.wait()
    # first died holding the lock (kill -9): its file still names it, and the next run takes it over
    assert run_lock._read_pid(run / run_lock.LOCK_FILE) == first.pid
    with caplog.at_level(logging.WARNING, logger="lowrank_rlhf.run.lock"):
        assert train(run, "--overwrite", "ppo.total_steps=1") == 0
    assert f"taking over the lock of process {first.pid}, which has ended" in caplog.text
    assert not (run / run_lock.LOCK_FILE).exists()


def test_nan_loss_skips_the_update_and_logs_it(tmp_path, caplog, monkeypatch):
    from lowrank_rlhf.rl import update as update_module  # where the losses are computed

    real, calls = update_module.policy_loss, []

    def nan_once(*args, **kwargs):  # the first minibatch's loss is NaN, the second one's is real
        loss, stats = real(*args, **kwargs)
        calls.append(loss.item())
        return (loss * float("nan"), stats) if len(calls) == 1 else (loss, stats)

    monkeypatch.setattr(update_module, "policy_loss", nan_once)
    trainer = make_trainer(recipe(tmp_path, "ppo.total_steps=1", "ppo.num_ppo_epochs=1", "ppo.num_mini_batches=2"))
    before = adapter_weights(trainer)
    with caplog.at_level(logging.WARNING, logger="lowrank_rlhf.rl.trainer"):
        trainer.train()
    assert "step 0: non-finite loss or gradient, update skipped (1 in a row)" in caplog.text
    metrics = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert metrics["skipped"] == 1 and trainer.nan_skips == 0  # one of two updates skipped, the other applied
    # the statistics average the applied update only: the skipped one adds no zeros (and no NaN)
    assert metrics["loss/policy_avg"] == pytest.approx(calls[1], rel=1e-5)
    assert any(not torch.equal(before[k], v) for k, v in adapter_weights(trainer).items())


@pytest.mark.parametrize("failing", [
    pytest.param("torch.save", id="optimizer-state"),
    pytest.param("lowrank_rlhf.models.roles.save_file", id="value-head-safetensors"),
])
def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, failing):
    straight = make_trainer(recipe(tmp_path / "straight", "ppo.total_steps=3"))
    straight.train()

    run = tmp_path / "run"
    trainer = make_trainer(recipe(run, "ppo.total_steps=3", "ppo.save_steps=1"))
    module_name, attr = failing.rsplit(".", 1)
    module = importlib.import_module(module_name)
    real = getattr(module, attr)

    def disk_full_in_the_second_checkpoint(obj, path, *args, **kwargs):
        if ".checkpoint.tmp-" in str(path) and trainer.step == 2:
            Path(path).write_bytes(b"\0" * 64)  # part of a file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(module, attr, disk_full_in_the_second_checkpoint)
    with pytest.raises(OSError) as err:
        trainer.train()
    monkeypatch.undo()
    assert err.value.errno == errno.ENOSPC and trainer.step == 2
    assert checkpoint_step(run) == 1  # the step-1 checkpoint is intact: manifest sizes and hashes match
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint"]  # no half-written one

    resumed = make_trainer(recipe(run, "ppo.total_steps=3", "ppo.save_steps=1", "ppo.resume=true"))
    resumed.train()
    assert resumed.step == 3 and checkpoint_step(run) == 3
    assert_same(adapter_weights(straight), adapter_weights(resumed), atol=0)


# --------------------------------------------------------------------------------------------------- 3. safety
def test_trust_remote_code_is_off_unless_the_recipe_turns_it_on(tiny_path, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    calls = []
    for cls in (AutoConfig, AutoModelForCausalLM, AutoTokenizer):
        def recording(*args, _real=cls.from_pretrained, _name=cls.__name__, **kwargs):
            calls.append((_name, kwargs.get("trust_remote_code", "not passed")))
            return _real(*args, **kwargs)
        monkeypatch.setattr(cls, "from_pretrained", recording)

    assert load_recipe(TINY).model.trust_remote_code is False
    models.load_base(ModelConfig(name="tiny-llama", quantization="none", device="cpu"))
    assert {name for name, _ in calls} == {"AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"}
    assert all(value is False for _, value in calls), calls
    calls.clear()
    cfg = load_recipe(TINY, ["model.trust_remote_code=true", "model.quantization=none"]).model
    models.load_base(cfg)
    assert calls and all(value is True for _, value in calls), calls


def test_optimizer_state_loads_with_weights_only(run_copy, monkeypatch):
    real, calls = torch.load, []

    def recording(*args, **kwargs):
        calls.append((str(args[0]), kwargs.get("weights_only")))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording)
    assert train(run_copy, "ppo.resume=true", "ppo.total_steps=3") == 0
    assert [Path(path).name for path, _ in calls] == ["trainer_state.pt"] and calls[0][1] is True


GUARDED_RUN = r"""
import json, os, socket, sys

connections, writes, loads = [], set(), []


def no_network(kind):
    def refuse(*args, **kwargs):
        connections.append(f"{kind} {args!r}"[:300])
        raise OSError(f"network disabled by test_reliability ({kind})")
    return refuse


socket.socket.connect = no_network("connect")
socket.socket.connect_ex = no_network("connect_ex")
socket.getaddrinfo = no_network("getaddrinfo")
socket.create_connection = no_network("create_connection")
try:  # the guard works: a connection is refused and recorded, not attempted
    socket.socket().connect(("127.0.0.1", 9))
    guard_works = False
except OSError as err:
    guard_works = "network disabled by test_reliability" in str(err) and len(connections) == 1
connections.clear()
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def where(path, dir_fd=None):
    if not isinstance(path, (str, bytes, os.PathLike)):
        return None
    path = os.fsdecode(path)
    if dir_fd is not None and not os.path.isabs(path):  # shutil.rmtree removes names relative to a directory fd
        try:
            return os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        except OSError:
            pass
    return os.path.abspath(path)


def audit(event, args):
    # every file Python opens for writing or creates, renames, copies, links or removes, anywhere
    if event == "open":
        path, mode, flags = args
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & WRITE_FLAGS):
            writes.add(where(path))
    elif event in ("os.remove", "os.rmdir"):
        writes.add(where(args[0], args[1]))
    elif event == "os.mkdir":
        writes.add(where(args[0], args[2]))
    elif event in ("os.truncate", "shutil.rmtree", "os.symlink", "os.link"):
        writes.add(where(args[0]))
    elif event in ("os.rename", "shutil.copyfile", "shutil.move"):
        writes.update((where(args[0]), where(args[1])))


sys.addaudithook(audit)

import transformers

for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM,
            transformers.AutoModelForSequenceClassification):
    def recording(*args, _real=cls.from_pretrained, _name=cls.__name__, **kwargs):
        loads.append([_name, str(kwargs.get("trust_remote_code", "not passed"))])
        return _real(*args, **kwargs)
    cls.from_pretrained = recording

from lowrank_rlhf.cli import main

code = main(sys.argv[1:])
print("REPORT " + json.dumps({"guard_works": guard_works, "connections": connections,
                              "writes": sorted(w for w in writes if w), "loads": loads}))
sys.exit(code)
"""


@pytest.fixture(scope="module")
def guarded_run(tmp_path_factory):
    """All three stages of recipes/tiny-cpu.yaml with sockets guarded, every write audited, HOME, TMPDIR and the
    working directory empty, the model cache (LOWRANK_RLHF_CACHE, with HF_HOME inside it) fresh, HF_HUB_OFFLINE=1."""
    base = tmp_path_factory.mktemp("guarded")
    dirs = {name: base / name for name in ("home", "tmp", "cache", "cwd")}
    for path in dirs.values():
        path.mkdir()
    script = base / "guarded_run.py"
    script.write_text(GUARDED_RUN)
    env = {k: v for k, v in SUBPROCESS_ENV.items() if not k.startswith(("HF_", "XDG_", "TRANSFORMERS_", "TORCH"))}
    env.update(HOME=str(dirs["home"]), TMPDIR=str(dirs["tmp"]), LOWRANK_RLHF_CACHE=str(dirs["cache"]),
               HF_HOME=str(dirs["cache"] / "huggingface"), HF_HUB_OFFLINE="1")
    run = base / "run"
    result = subprocess.run([sys.executable, str(script), "train", TINY, "--output-dir", str(run)], cwd=dirs["cwd"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.split("REPORT ", 1)[1])
    return {"run": run, "report": report, **dirs}


def test_an_offline_run_opens_no_network_connection(guarded_run):
    assert guarded_run["report"]["guard_works"]
    assert guarded_run["report"]["connections"] == []
    assert (guarded_run["run"] / "policy" / "adapter_model.safetensors").is_file()  # and it did run to the end


def test_nothing_is_written_outside_the_run_dir_the_cache_and_tmp(guarded_run):
    allowed = [guarded_run[k] for k in ("run", "cache", "tmp")] + [Path("/dev")]
    outside = [w for w in guarded_run["report"]["writes"]
               if not any(Path(w) == a or a in Path(w).parents for a in allowed)]
    assert outside == []
    assert any(Path(w).is_relative_to(guarded_run["run"]) for w in guarded_run["report"]["writes"])  # the audit saw
    for empty in ("home", "cwd"):  # and writes by native code (safetensors, torch, tokenizers) land nowhere else
        assert list(guarded_run[empty].rglob("*")) == [], empty
    assert (guarded_run["cache"] / "tiny-llama-v2" / "config.json").is_file()


def test_trust_remote_code_stays_off_in_every_stage(guarded_run):
    loads = guarded_run["report"]["loads"]
    assert {name for name, _ in loads} >= {"AutoConfig", "AutoTokenizer", "AutoModelForCausalLM",
                                           "AutoModelForSequenceClassification"}
    assert all(value == "False" for _, value in loads), loads


WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".npy", ".npz", ".h5", ".msgpack")


def test_weights_are_written_as_safetensors_only(guarded_run):
    run = guarded_run["run"]
    files = [p.relative_to(run) for p in run.rglob("*") if p.is_file()]
    assert [str(p) for p in files if p.suffix in WEIGHT_SUFFIXES] == ["checkpoint/trainer_state.pt"]
    weights = {str(p) for p in files if p.suffix == ".safetensors"}
    for role in ("sft", "reward", "policy", "value"):
        assert f"{role}/adapter_model.safetensors" in weights, role
    assert {"reward/reward_head.safetensors", "value/value_head.safetensors"} <= weights
    state = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=True)  # tensors and plain types only
    assert set(state) == {"optimizer", "scheduler", "rng"}


# ------------------------------------------------------------------------------------------------ 4. the table
def table_rows() -> list[list[str]]:
    rows = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 3 and not set(cells[0]) <= set("-: ") and cells[0] != "Case":
            rows.append(cells)
    return rows


def parametrize_ids(fn) -> set[str]:
    ids = set()
    for mark in getattr(fn, "pytestmark", []):
        if mark.name == "parametrize":
            ids |= {getattr(v, "id", None) for v in mark.args[1]} | set(mark.kwargs.get("ids") or [])
    return ids - {None}


def test_the_reliability_table_names_tests_that_exist():
    rows = table_rows()
    assert len(rows) >= 20
    referenced = set()
    for case, behaviour, tests in rows:
        refs = re.findall(r"`(tests/[\w/]+\.py)::(\w+)(?:\[([\w-]+)\])?`", tests)
        assert refs and case and behaviour, f"row without a test: {case}"
        for path, name, param in refs:
            assert (ROOT / path).is_file(), path
            fn = getattr(importlib.import_module(Path(path).stem), name, None)
            assert callable(fn), f"{path}::{name} does not exist"
            if param:
                assert param in parametrize_ids(fn), f"{path}::{name} has no case [{param}]"
            if path == "tests/test_reliability.py":
                referenced.add(name)
    here = {node.name for node in ast.parse(Path(__file__).read_text()).body
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}
    assert here - referenced == set(), "tests missing from docs/reliability.md"
