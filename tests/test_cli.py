"""The `lowrank-rlhf` command as a user meets it: every stage end to end, --help, and one-line errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import error_line
from lowrank_rlhf.cli import build_parser, main
from lowrank_rlhf.commands.inference import load_run
from lowrank_rlhf.config import ModelConfig
from lowrank_rlhf.models.loading import load_base
from lowrank_rlhf.run.checkpoint import write_manifest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny-cpu.yaml")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """recipes/tiny-cpu.yaml through all three stages, in 4-bit on CPU, via `python -m lowrank_rlhf`."""
    run = tmp_path_factory.mktemp("cli") / "run"
    result = subprocess.run([sys.executable, "-m", "lowrank_rlhf", "train", TINY, "--output-dir", str(run)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def test_train_runs_every_stage(tiny_run):
    for role in ("sft", "reward", "policy", "value"):
        assert (tiny_run / role / "adapter_model.safetensors").is_file(), role
    assert (tiny_run / "reward" / "reward_head.safetensors").is_file()
    assert (tiny_run / "value" / "value_head.safetensors").is_file()
    lines = (tiny_run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "objective/kl" in json.loads(lines[0])


def test_run_directory_loads_with_plain_peft(tiny_run):
    """Each adapter, loaded by plain PEFT onto a freshly loaded base, gives the logits our RoleModel gives under that
    role, and the heads saved beside the adapters give RoleModel's values and rewards."""
    ours = load_run(tiny_run, roles=("sft", "reward", "policy", "value"))
    ids = torch.tensor([[5, 6, 7, 40, 50, 60, 70, 80]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours.activate("base")
        base_logits = ours.causal_lm(ids).logits
        for role in ("sft", "reward", "policy", "value"):
            base, _ = load_base(ModelConfig(name="tiny-llama", quantization="4bit", device="cpu"))
            plain = peft.PeftModel.from_pretrained(base, str(tiny_run / role))
            out = plain(ids, output_hidden_states=True)
            ours.activate(role)
            expected = ours.causal_lm(ids).logits
            assert out.logits.shape[-1] == base.config.vocab_size
            torch.testing.assert_close(out.logits, expected, rtol=0, atol=1e-5)
            assert not torch.allclose(out.logits, base_logits, rtol=0, atol=1e-5), f"{role}: adapter had no effect"
            head_file = {"value": "value_head.safetensors", "reward": "reward_head.safetensors"}.get(role)
            if head_file:
                head = torch.nn.Linear(base.config.hidden_size, 1)
                head.load_state_dict(load_file(str(tiny_run / role / head_file)))
                scores = head(out.hidden_states[-1].float()).squeeze(-1)
                if role == "value":
                    torch.testing.assert_close(scores[:, 3:-1], ours.token_values(ids, mask, 4), rtol=0, atol=1e-5)
                else:
                    torch.testing.assert_close(scores[:, -1], ours.sequence_rewards(ids, mask), rtol=0, atol=1e-5)


def run_with_a_strong_policy(tiny_run, tmp_path):
    """A copy of the run whose policy lora_B is random: after 2 PPO steps the real adapter moves the logits by less
    than bf16 rounding, too little to tell a right merge from a wrong one."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    weights = run / "policy" / "adapter_model.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(v.shape, generator=g) * 0.2 if "lora_B" in k else v
               for k, v in load_file(str(weights)).items()}, str(weights))
    write_manifest(run / "policy")  # a deliberate edit: sealed again, else every loader refuses it as damaged
    return run


def test_generate_and_export(tiny_run, tmp_path, capsys):
    """Generate, export the adapter, export merged: the merged bf16 model gives the logits of the policy adapter on
    the 4-bit base it trained on (DESIGN.md 3b: the merge goes into the dequantized base). After 2 PPO steps the
    policy barely moves the logits, so the merge is checked on a copy of the run whose policy has random lora_B, an
    effect far above bf16 rounding."""
    assert main(["generate", str(tiny_run), "--prompt", "hello", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip() != ""
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "adapter")]) == 0
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()

    run = run_with_a_strong_policy(tiny_run, tmp_path)
    assert main(["export", str(run), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    saved_config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert saved_config["dtype"] == "bfloat16" and "quantization_config" not in saved_config

    adapter_model = load_run(run, roles=("policy",))
    ids = torch.tensor([list(range(5, 40))])
    with torch.no_grad():
        adapter_model.activate("policy")
        expected = adapter_model.causal_lm(ids).logits
        adapter_model.activate("base")
        base_logits = adapter_model.causal_lm(ids).logits
        logits = merged(ids).logits
    assert (expected - base_logits).abs().max() > 1.0  # the adapter matters far more than the tolerance below
    # bf16 rounding of the merged weights costs ~0.04; merging into the original (not dequantized) tiny-llama
    # weights would be ~0.7 off
    torch.testing.assert_close(logits, expected, rtol=0, atol=0.1)


def test_export_merge_into_original_warns_and_merges_into_the_unquantized_weights(tiny_run, tmp_path, caplog):
    """--merge-into original: the policy merged into the original (unquantized) weights, with a warning that the
    adapter never saw them; its logits are the adapter's on the unquantized base, not on the 4-bit one."""
    run = run_with_a_strong_policy(tiny_run, tmp_path)
    with caplog.at_level("WARNING", logger="lowrank_rlhf.commands.export"):
        assert main(["export", str(run), "--out", str(tmp_path / "orig"), "--merge-into", "original"]) == 0
    assert "--merge-into original: merging into the unquantized weights of tiny-llama" in caplog.text
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "orig", dtype=torch.float32)
    base, _ = load_base(ModelConfig(name="tiny-llama", quantization="none", device="cpu"))
    plain = peft.PeftModel.from_pretrained(base, str(run / "policy"))
    ids = torch.tensor([list(range(5, 40))])
    with torch.no_grad():
        expected, logits = plain(ids).logits, merged(ids).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=0.1)


def test_commands_do_not_print_the_missing_hub_kernel_warning():
    """bitsandbytes' 'Failed to load CPU gemm_4bit_forward' notice concerns a path we switch off (models/__init__)."""
    result = subprocess.run([sys.executable, "-m", "lowrank_rlhf", "--help"], capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "gemm_4bit_forward" not in result.stderr + result.stdout


def test_existing_results_are_refused_and_untouched(tiny_run, capsys):
    before = (tiny_run / "policy" / "adapter_model.safetensors").read_bytes()
    assert main(["train", TINY, "--output-dir", str(tiny_run), "--stage", "ppo"]) == 2
    err = error_line(capsys.readouterr().err)
    assert "already holds ppo results" in err and "--overwrite" in err
    assert (tiny_run / "policy" / "adapter_model.safetensors").read_bytes() == before


@pytest.mark.parametrize("command", ["quickstart", "train", "plan", "generate", "export", "bench"])
def test_help_works_on_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: lowrank-rlhf" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["", "train", "compare", "bench"])
def test_help_imports_neither_torch_nor_transformers(command):
    """--help stays fast because it never imports the heavy libraries (they took ~6 s of a 10 s --help)."""
    code = ("import sys\nfrom lowrank_rlhf.cli import main\n"
            f"try:\n    main({[a for a in (command, '--help') if a]!r})\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules)\n"
            "print('HEAVY', heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: lowrank-rlhf" in result.stdout
    assert "HEAVY []" in result.stdout


def test_the_cli_offers_every_eval_task():
    from lowrank_rlhf.cli import TASK_NAMES
    from lowrank_rlhf.commands.evaluation import TASKS

    assert TASK_NAMES == tuple(TASKS)


def test_the_package_still_offers_its_public_names():
    import lowrank_rlhf

    assert set(lowrank_rlhf.__all__) <= set(dir(lowrank_rlhf))
    for name in lowrank_rlhf.__all__:
        assert getattr(lowrank_rlhf, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        lowrank_rlhf.nonexistent  # noqa: B018


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


BAD_INPUTS = [
    (["ppo.kl_cof=0.1"], "ppo.kl_cof: unknown key; did you mean 'kl_coef'?"),
    (["ppo.kl_estimator=k2"], "allowed values: k1, k3"),
    (["ppo.gamma=1.5"], "allowed range: [0.0, 1.0]"),
    (["ppo.total_steps=many"], "expected an integer"),
    (["data.prompts=/nonexistent/prompts.jsonl"], "file not found"),
]


@pytest.mark.parametrize("overrides, message", BAD_INPUTS)
def test_bad_recipe_values_give_one_line_errors(tmp_path, capsys, overrides, message):
    code = main(["train", TINY, "--stage", "ppo", "--output-dir", str(tmp_path / "run"), *overrides])
    err = error_line(capsys.readouterr().err)
    assert code == 2 and message in err, err


def test_missing_column_and_empty_dataset(tmp_path, capsys):
    no_prompt = write(tmp_path / "p.jsonl", '{"question": "hi", "label": "yes"}\n')
    empty = write(tmp_path / "e.jsonl", "")
    for source, message in ((no_prompt, "columns found: question, label"),
                            (empty, "has no rows")):
        code = main(["train", TINY, "--stage", "ppo", "--output-dir", str(tmp_path / "run"),
                     f"data.prompts={source}", "rewards.learned_weight=0",
                     "rewards.functions=[lowrank_rlhf.rewards:brevity]"])
        err = error_line(capsys.readouterr().err)
        assert code == 2 and message in err, err


def test_plan_prints_the_table_and_refuses_a_budget_below_the_floor(capsys):
    recipe = str(ROOT / "recipes" / "llama2-7b-rtx3090.yaml")
    assert main(["plan", recipe]) == 0
    out = capsys.readouterr().out
    assert "generate" in out and "train" in out and "fits" in out
    assert main(["plan", recipe, "--budget", "4GiB"]) == 2
    err = error_line(capsys.readouterr().err)
    assert "below the static floor 5.09 GiB" in err
    assert main(["plan", recipe, "memory.micro_batch={train: 2}"]) == 0
    assert "memory.micro_batch fixes train=2: the run uses it" in capsys.readouterr().out


def test_quickstart_smoke_runs(tmp_path, capsys):
    assert main(["quickstart", "--smoke", "--output-dir", str(tmp_path / "qs")]) == 0
    out = capsys.readouterr().out
    assert "after PPO" in out and "exactly yes/no" in out
    report = json.loads((tmp_path / "qs" / "report.json").read_text())
    assert set(report["results"]) == {"base", "after SFT", "after PPO"}
    assert (tmp_path / "qs" / "curves.png").stat().st_size > 1000


def test_train_closes_the_process_group_after_every_stage_under_torchrun(monkeypatch, tmp_path):
    """Under torchrun the command waits for every rank, then closes the group; without one it touches nothing."""
    import torch.distributed as dist

    from lowrank_rlhf import cli, pipeline

    calls = []
    monkeypatch.setattr(pipeline, "run_stages", lambda *a, **k: calls.append("stages") or {})
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: calls.append("destroy"))
    argv = ["train", TINY, "--stage", "sft", "--output-dir", str(tmp_path / "run")]
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    assert cli.main(argv) == 0 and calls == ["stages"]
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    calls.clear()
    assert cli.main(argv) == 0 and calls == ["stages", "barrier", "destroy"]


def test_text2sql_breakdown_script_counts_per_template_and_refuses_to_overwrite(tiny_run, tmp_path):
    """scripts/text2sql_breakdown.py on a run: one line per template, a total over the 56 held-out questions, every
    answer in --json; an existing --json is refused with exit 2 and left as it was."""
    script = ROOT / "scripts" / "text2sql_breakdown.py"
    out = tmp_path / "breakdown.json"
    cmd = [sys.executable, str(script), str(tiny_run), "--role", "sft", "--samples", "2", "--json", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    total = [line for line in result.stdout.splitlines() if line.startswith("total")]
    assert total and total[0].split("\t")[1] == "56"
    rows = json.loads(out.read_text())
    assert len(rows) == 56 and all(len(r["samples"]) == 2 and r["template"] is not None for r in rows)
    greedy_right = sum(r["greedy_right"] for r in rows)
    assert int(total[0].split("\t")[2]) == greedy_right
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 2 and "exists" in again.stderr and json.loads(out.read_text()) == rows
