"""The DPO stage on tiny-llama (4-bit and 8-bit, CPU): the policy adapter trains from RUN/sft against TRL's frozen
copy of it (implicit rewards exactly 0 at step 0), RUN/policy is a plain PEFT adapter that generate/eval/export read,
`--stage dpo` and `dpo.enabled` route the pipeline, and the quickstart runs with --algorithm dpo and grpo."""

import json

import datasets
import peft
import pytest
import torch
from safetensors.torch import load_file

from conftest import error_line
from lowrank_rlhf import stages
from lowrank_rlhf.cli import build_parser, main
from lowrank_rlhf.commands.evaluation import evaluate_run
from lowrank_rlhf.commands.inference import load_run
from lowrank_rlhf.commands.quickstart import ALGORITHMS, quickstart_recipe, run_quickstart
from lowrank_rlhf.config import ConfigError, LoraConfig, ModelConfig, RecipeConfig, load_recipe, to_dict
from lowrank_rlhf.models.loading import load_base
from lowrank_rlhf.pipeline import DPO_SKIPS, run_stages, stages_for
from lowrank_rlhf.recipes import recipe_path
from lowrank_rlhf.run.directory import RunDirError

TINY = str(recipe_path("tiny-cpu.yaml"))
DPO_SMALL = ["dpo.max_steps=2", "dpo.batch_size=4", "dpo.max_length=256", "dpo.learning_rate=1e-3"]
# the quickstart's path on tiny-llama: its tokenizer is byte-level (one token per character), so longer limits
QUICK_TINY = ["model.name=tiny-llama", "data.max_prompt_length=160", "data.max_samples=8", "sft.max_length=256",
              "reward_model.max_length=256", "dpo.max_length=256", "sft.batch_size=4", "reward_model.batch_size=4",
              "dpo.batch_size=4", "lora.r=4", "lora.alpha=8", "ppo.eval_steps=0",
              "ppo.load_best_at_end=false"]


pytestmark = pytest.mark.usefixtures("offline_single_thread")  # conftest: offline, one thread


def recipe(quantization: str) -> RecipeConfig:
    cfg = RecipeConfig(model=ModelConfig(name="tiny-llama", quantization=quantization, device="cpu"),
                       lora=LoraConfig(r=8, alpha=16))
    cfg.sft.max_steps, cfg.sft.batch_size, cfg.sft.learning_rate = 2, 4, 1e-3
    cfg.dpo.max_steps, cfg.dpo.batch_size, cfg.dpo.learning_rate = 3, 4, 1e-3
    return cfg


def pairs(n: int = 12) -> datasets.Dataset:
    return datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": f"q{i}?"}],
                                        "chosen": [{"role": "assistant", "content": "yes"}],
                                        "rejected": [{"role": "assistant", "content": "no, never"}]}
                                       for i in range(n)])


def adapter_state(model, adapter: str) -> dict:
    return {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(model, adapter_name=adapter).items()}


@pytest.fixture(scope="module", params=["4bit", "8bit"])
def sft_run(request, tmp_path_factory):
    cfg = recipe(request.param)
    run = tmp_path_factory.mktemp(f"dpo-{request.param}")
    sft = datasets.Dataset.from_list([{"prompt": f"say {w}", "completion": w} for w in ["yes", "no"] * 4])
    stages.train_sft(cfg, sft, run)
    return cfg, run


def test_policy_trains_from_sft_against_a_frozen_copy_of_it(sft_run):
    """TRL's 'ref' adapter is RUN/sft exactly and stays so; the policy starts equal to it (DPO rewards exactly 0 at
    the first step, before any update: TRL's bf16 rounding of the policy is undone) and moves; RUN/sft is untouched."""
    cfg, run = sft_run
    sft_file = run / "sft" / "adapter_model.safetensors"
    sft = load_file(str(sft_file))
    trainer = stages.dpo_trainer(cfg, pairs(), run / "scratch", run)
    model = trainer.model
    assert set(model.peft_config) == {"default", "ref"} and model.active_adapter == "default"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    policy_before, ref_before = adapter_state(model, "default"), adapter_state(model, "ref")
    assert set(policy_before) == set(ref_before) == set(sft)
    assert all(torch.equal(policy_before[k], sft[k]) and torch.equal(ref_before[k], sft[k]) for k in sft)

    trainer.train()
    first = next(e for e in trainer.state.log_history if "rewards/chosen" in e)
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0 and first["rewards/margins"] == 0.0
    assert trainer.state.global_step == 3
    policy_after, ref_after = adapter_state(model, "default"), adapter_state(model, "ref")
    assert any(not torch.equal(policy_after[k], policy_before[k]) for k in sft)  # the policy trained
    assert all(torch.equal(ref_after[k], ref_before[k]) for k in sft)  # the reference did not
    last = [e for e in trainer.state.log_history if "rewards/chosen" in e][-1]
    assert last["rewards/margins"] != 0.0

    stages.save_policy(trainer, cfg, run)
    assert load_file(str(sft_file)).keys() == sft.keys()
    assert all(torch.equal(load_file(str(sft_file))[k], sft[k]) for k in sft)  # RUN/sft untouched
    saved = load_file(str(run / "policy" / "adapter_model.safetensors"))
    assert set(saved) == set(sft) and all(torch.equal(saved[k], policy_after[k]) for k in saved)
    # plain PEFT, no code of ours, on a freshly loaded base: the trained weights, no reference in the folder
    base, _ = load_base(cfg.model)
    plain = peft.PeftModel.from_pretrained(base, str(run / "policy"))
    loaded = peft.get_peft_model_state_dict(plain)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert not (run / "policy" / "ref").exists()
    assert "policy" in json.loads((run / "lowrank_rlhf.json").read_text())["roles"]


def test_dpo_examples_use_the_rollout_layout(sft_run):
    """prompt ids as PPO encodes its prompts, the answers ending in eos; too-long pairs skipped, none left = error."""
    from lowrank_rlhf import data
    from lowrank_rlhf.models.loading import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path("tiny-llama"))
    ex = stages.dpo_examples(pairs(2), tok, 256)[0]
    assert ex["prompt_ids"] == data.encode_prompts([[{"role": "user", "content": "q0?"}]], tok, 1000)[0]
    assert tok.decode(ex["chosen_ids"]) == "yes</s>" and ex["rejected_ids"][-1] == tok.eos_token_id
    with pytest.raises(ConfigError, match="dpo.max_length"):
        stages.dpo_examples(pairs(2), tok, 8)


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    """recipes/tiny-cpu.yaml with dpo.enabled: `--stage all` = sft -> dpo."""
    run = tmp_path_factory.mktemp("dpo-pipeline") / "run"
    cfg = load_recipe(TINY, ["dpo.enabled=true", *DPO_SMALL, f"run_dir={run}"])
    return cfg, run, run_stages(cfg, stages_for(cfg), run)


def test_dpo_enabled_runs_sft_then_dpo_only(dpo_run):
    cfg, run, results = dpo_run
    assert stages_for(cfg) == ["sft", "dpo"] and results["skipped"] == DPO_SKIPS
    assert set(results) == {"sft", "dpo", "skipped"}
    dpo = results["dpo"]
    assert dpo["steps"] == 2 and dpo["rewards/margins_first"] == 0.0 and dpo["eval_pairs"] > 0
    assert {"rewards/chosen_last", "rewards/margins_last", "rewards/accuracies_last"} <= set(dpo)
    assert {"rewards/margins", "rewards/accuracies"} <= set(dpo["eval"])
    assert json.loads((run / "policy" / "dpo_metrics.json").read_text())["steps"] == 2
    assert not any((run / n).exists() for n in ("reward", "value", "checkpoint", "metrics.jsonl"))
    assert not [p.name for p in run.iterdir() if p.name.startswith(".dpo-")]  # TRL's scratch folder removed
    load_recipe(None)  # the default recipe keeps DPO off: --stage all is sft -> reward -> ppo
    assert stages_for(load_recipe(TINY)) == ["sft", "reward", "ppo"]


def test_generate_and_eval_read_the_dpo_policy(dpo_run, tmp_path):
    """RUN/policy from DPO loads where online RL's does: inference.load_run (generate, export) and `eval`."""
    _, run, _ = dpo_run
    model = load_run(run)
    saved = load_file(str(run / "policy" / "adapter_model.safetensors"))
    loaded = peft.get_peft_model_state_dict(model.peft, adapter_name="policy")
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)
    sft = load_file(str(run / "sft" / "adapter_model.safetensors"))
    assert any(not torch.equal(saved[k], sft[k]) for k in saved)
    held_out = tmp_path / "held.jsonl"
    held_out.write_text("".join(json.dumps({"prompt": f"say {w}"}) + "\n" for w in ("yes", "no")))
    report = evaluate_run(run, held_out=str(held_out), functions=["lowrank_rlhf.rewards:exact_yes_no"],
                          max_new_tokens=3, model=model)
    assert set(report["results"]) == {"base", "sft", "policy"}


def test_stage_choices_overwrite_and_missing_sft(dpo_run, tmp_path, capsys):
    cfg, run, _ = dpo_run
    stage = next(a for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions
                 if a.dest == "stage")
    assert set(stage.choices) == {"sft", "reward", "rl", "ppo", "dpo", "all"}  # rl: online RL; ppo its old name
    with pytest.raises(ConfigError, match="allowed values: sft, reward, ppo, dpo, rl, all"):
        stages_for(cfg, "grpo")
    # a second DPO run refuses to replace the policy, PPO too (they write the same RUN/policy); the eval report
    # written above (test_generate_and_eval_read_the_dpo_policy) is ours and no obstacle
    assert list(run.glob("eval-*.json"))
    with pytest.raises(RunDirError, match="already holds a trained policy \\(policy\\); pass --overwrite"):
        run_stages(cfg, ["dpo"], run)
    with pytest.raises(RunDirError, match="already holds ppo results \\(policy\\)"):
        run_stages(cfg, ["ppo"], run)
    # --overwrite: DPO replaces the policy and drops online RL's results, which would describe another policy
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    before = (run / "policy" / "adapter_model.safetensors").stat().st_mtime_ns
    assert run_stages(cfg, ["dpo"], run, overwrite=True)["dpo"]["steps"] == 2
    assert not (run / "metrics.jsonl").exists()
    assert (run / "policy" / "adapter_model.safetensors").stat().st_mtime_ns != before
    # DPO without an SFT adapter: one line, exit 2, nothing written
    empty = tmp_path / "empty"
    code = main(["train", TINY, "--stage", "dpo", "--output-dir", str(empty)])
    line = error_line(capsys.readouterr().err)
    assert code == 2 and "sft" in line and "--stage sft" in line
    assert not empty.exists()


def test_quickstart_algorithms_are_recipe_overrides():
    """ppo is today's quickstart exactly; every other algorithm changes only the keys it lists."""
    base = to_dict(quickstart_recipe(run_dir="r"))
    assert to_dict(quickstart_recipe(run_dir="r", algorithm="ppo")) == base
    for algorithm, overrides in ALGORITHMS.items():
        cfg = quickstart_recipe(run_dir="r", algorithm=algorithm)
        changed = {f"{s}.{k}" for s, v in to_dict(cfg).items() if isinstance(v, dict) for k in v if v[k] != base[s][k]}
        assert changed <= {o.split("=")[0] for o in overrides} and bool(changed) == (algorithm != "ppo")
        smoke = quickstart_recipe(smoke=True, run_dir="r", algorithm=algorithm)
        assert smoke.ppo.rollout_batch_size % smoke.ppo.num_generations == 0
        assert cfg.ppo.rollout_batch_size % cfg.ppo.num_generations == 0
        assert stages_for(cfg) == (["sft", "dpo"] if algorithm == "dpo" else ["sft", "reward", "ppo"])
    with pytest.raises(ConfigError, match="allowed values: ppo, grpo, rloo, reinforce_pp, dpo"):
        quickstart_recipe(algorithm="sft")
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["quickstart", "--algorithm", "nope"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("algorithm", ["dpo", "grpo"])
def test_quickstart_runs_with_algorithm(algorithm, tmp_path):
    """The quickstart's whole path (train, held-out report) per algorithm, on tiny-llama in smoke sizes."""
    run = tmp_path / algorithm
    report = run_quickstart(run, smoke=True, algorithm=algorithm, overrides=QUICK_TINY, show_samples=1)
    label = {"dpo": "after DPO", "grpo": "after GRPO"}[algorithm]
    assert report["algorithm"] == algorithm and list(report["results"]) == ["base", "after SFT", label]
    for result in report["results"].values():
        assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["exact_yes_no"] <= 1.0
        assert len(result["answers"]) == report["held_out"] == 8
    saved = json.loads((run / "report.json").read_text())
    assert saved["results"][label]["accuracy"] == report["results"][label]["accuracy"]
    if algorithm == "dpo":
        assert report["stages"]["skipped"] == DPO_SKIPS and "dpo" in report["stages"]
        assert not (run / "reward").exists() and not (run / "metrics.jsonl").exists()
        assert report["results"][label]["learned_reward"] is None
    else:
        assert (run / "reward").is_dir() and not (run / "value").exists()  # critic-free: no value role saved
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert len([r for r in rows if "objective/kl" in r]) == 2 and (run / "curves.png").is_file()
