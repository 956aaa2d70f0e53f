"""RL health while training, on tiny-llama with a reward hacked on purpose: the policy is paid for lowercase
letters, the held-out check wants the opposite. The eval metrics must show it, RUN/best must keep the policy from
before the hacking, and the over-optimisation alarm must fire (and stop the run when asked to)."""

import json
import logging

import pytest
import torch
from test_trainer import make_trainer, recipe

from lowrank_rlhf.rewards import Scorer, load_reward_functions
from lowrank_rlhf.rl.health import SCORE, HeldOutEval, OveroptimizationAlarm, best_metric_name
from lowrank_rlhf.rl.trainer import PPOTrainer

REWARDS = '''
def letters(prompts, completions, **kwargs):
    return [sum(c.islower() for c in text) / max(len(text), 1) for text in completions]

def no_letters(prompts, completions, **kwargs):
    return [1 - sum(c.islower() for c in text) / max(len(text), 1) for text in completions]
'''
LEARN = ("ppo.rollout_batch_size=16", "ppo.response_length=8", "ppo.num_ppo_epochs=4", "ppo.learning_rate=1e-2",
         "lora.r=8", "ppo.kl_coef=0.01", "ppo.lr_scheduler_type=constant", "ppo.eval_steps=3",
         "ppo.temperature=1.0")


def hacked_trainer(tmp_path, *overrides):
    path = tmp_path / "hack.py"
    path.write_text(REWARDS)
    trainer = make_trainer(recipe(tmp_path, *LEARN, *overrides))
    model, prompts = trainer.model, trainer.prompts
    texts = [model.tokenizer.decode(p) for p in prompts]
    letters, no_letters = f"{path}:letters", f"{path}:no_letters"
    trained = load_reward_functions([letters])
    held_out = {**load_reward_functions([no_letters], [0.0]), **trained}  # eval-only: weight 0
    evaluation = HeldOutEval(prompts[:8], Scorer(model, 0.0, held_out, texts, {}), 8, trainer.stop_ids)
    return PPOTrainer(model, trainer.cfg, prompts, Scorer(model, 0.0, trained, texts, {}), show_progress=False,
                      evaluation=evaluation)


def eval_lines(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "eval/no_letters" in line]


def test_health_metrics_show_the_hack_best_keeps_the_policy_before_it_and_the_alarm_stops(tmp_path, caplog):
    trainer = hacked_trainer(tmp_path, "ppo.total_steps=30", "ppo.overoptimization_patience=2",
                             "ppo.stop_on_overoptimization=true")
    assert trainer.best_metric == "eval/no_letters"
    with caplog.at_level(logging.WARNING, logger="lowrank_rlhf.rl.trainer"):
        trainer.train()
    evals = eval_lines(tmp_path)
    assert [e["step"] for e in evals] == list(range(0, trainer.step + 1, 3))  # before the first step, every 3
    first, last = evals[0], evals[-1]
    assert last[SCORE] > first[SCORE] + 0.1  # the hacked reward went up on held-out prompts...
    assert last["eval/no_letters"] < first["eval/no_letters"] - 0.1  # ...and the real goal down
    assert all(0 < e["eval/top_answer_share"] <= 1 for e in evals)
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    assert best["metric"] == "eval/no_letters" and best["value"] == max(e["eval/no_letters"] for e in evals)
    assert (tmp_path / "best" / "policy" / "adapter_model.safetensors").is_file()
    alarms = [r.message for r in caplog.records if "over-optimisation" in r.message]
    assert len(alarms) == 1 and "for 2 evaluations in a row" in alarms[0] and "stopping" in alarms[0]
    assert trainer.step < 30  # stopped early, and saved like a finished run
    assert (tmp_path / "checkpoint").is_dir() and (tmp_path / "policy").is_dir()


def test_alarm_counts_only_consecutive_hacked_evaluations():
    alarm = OveroptimizationAlarm("eval/acc", patience=2)
    # best at 0.9; hacked once; a new best (0.95 at score 0.1) re-arms; then hacked twice in a row
    seq = [(0.0, 0.9), (0.5, 0.8), (0.1, 0.95), (0.6, 0.6), (0.7, 0.5)]
    fired = [alarm.update({SCORE: s, "eval/acc": a}) for s, a in seq]
    assert fired == [False, False, False, False, True]
    assert not OveroptimizationAlarm(SCORE, 1).update({SCORE: 1.0})  # watching the score itself: never


def test_best_metric_must_be_an_eval_metric(tmp_path):
    from lowrank_rlhf.config import ConfigError

    evaluation = HeldOutEval([], Scorer(None, 0.0, load_reward_functions(["lowrank_rlhf.rewards:brevity"]), [], {}),
                             4, [])
    assert best_metric_name("", evaluation) == "eval/brevity"
    with pytest.raises(ConfigError, match="ppo.best_metric: 'eval/acc' is not an eval metric"):
        best_metric_name("eval/acc", evaluation)


def test_load_best_at_end_makes_the_best_policy_run_policy_and_keeps_the_last_in_the_checkpoint(tmp_path):
    """transformers' load_best_model_at_end for the RL loop: RUN/policy holds RUN/best's weights, the last step's
    policy stays in RUN/checkpoint (resume continues from it), and a run without evaluations is refused."""
    from safetensors.torch import load_file

    from lowrank_rlhf.config import ConfigError
    from lowrank_rlhf.pipeline import preflight

    trainer = hacked_trainer(tmp_path, "ppo.total_steps=9", "ppo.load_best_at_end=true")
    trainer.train()
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    assert best["step"] < trainer.step == 9  # the hack made an early policy the best
    weights = "adapter_model.safetensors"
    final, chosen = load_file(tmp_path / "policy" / weights), load_file(tmp_path / "best" / "policy" / weights)
    last = load_file(tmp_path / "checkpoint" / "policy" / weights)
    assert final.keys() == chosen.keys() and all(final[k].equal(chosen[k]) for k in final)
    assert any(not final[k].equal(last[k]) for k in final)

    with pytest.raises(ConfigError, match="ppo.load_best_at_end: there is no RUN/best"):
        preflight(recipe(tmp_path / "other", "ppo.load_best_at_end=true", "ppo.eval_steps=0",
                         "data.prompts=bundled:clickbait_prompts"), ["ppo"],
                  tmp_path / "other")


def test_each_reward_source_is_a_step_metric(tmp_path):
    """TRL's rewards/<name>/mean: every source of the score on its own, unweighted, beside the weighted sum."""
    path = tmp_path / "hack.py"
    path.write_text(REWARDS)
    trainer = make_trainer(recipe(tmp_path, "ppo.total_steps=2"))
    texts = [trainer.model.tokenizer.decode(p) for p in trainer.prompts]
    functions = load_reward_functions([f"{path}:letters", f"{path}:no_letters"], [2.0, 0.5])
    trainer.scorer = Scorer(trainer.model, 0.0, functions, texts, {})
    history = trainer.train()
    for step in history:
        letters, no_letters = step["rewards/letters/mean"], step["rewards/no_letters/mean"]
        assert 0 <= letters <= 1 and letters + no_letters == pytest.approx(1, abs=1e-5)  # unweighted
        assert step["objective/raw_scores"] == pytest.approx(2.0 * letters + 0.5 * no_letters, abs=1e-5)


def test_the_share_of_prompts_whose_samples_all_scored_alike_is_a_step_metric(tmp_path):
    """TRL's frac_reward_zero_std: a prompt group whose samples all score the same teaches GRPO nothing."""
    from lowrank_rlhf.rl.algorithms import zero_std_share

    assert zero_std_share(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5]), 2) == pytest.approx(2 / 3)
    path = tmp_path / "flat.py"
    path.write_text("def flat(prompts, completions, **kwargs):\n    return [1.0] * len(completions)\n")
    trainer = make_trainer(recipe(tmp_path, "ppo.total_steps=1", "ppo.algorithm=grpo", "ppo.num_generations=4",
                                  "ppo.kl_coef=0.0"))
    texts = [trainer.model.tokenizer.decode(p) for p in trainer.prompts]
    trainer.scorer = Scorer(trainer.model, 0.0, load_reward_functions([f"{path}:flat"]), texts, {})
    assert trainer.train()[0]["frac_reward_zero_std"] == 1.0
