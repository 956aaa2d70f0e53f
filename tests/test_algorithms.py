"""The critic-free algorithms' math (rl/algorithms.py) on tensors computed by hand, as tests/test_ppo.py does."""

import math

import pytest
import torch

from lowrank_rlhf.config import ConfigError, PPOConfig, load_recipe
from lowrank_rlhf.rl import algorithms as alg

SQRT2 = math.sqrt(2.0)


# --------------------------------------------------------------------------- config
def test_algorithm_defaults_to_ppo_and_unknown_values_name_the_allowed_ones():
    ppo = load_recipe(None).ppo
    assert (ppo.algorithm, ppo.beta, ppo.epsilon, ppo.epsilon_high, ppo.loss_type, ppo.scale_rewards,
            ppo.mask_truncated_completions) == ("ppo", 0.04, 0.2, None, "dapo", "group", False)
    with pytest.raises(ConfigError, match="allowed values: ppo, grpo, rloo, reinforce_pp"):
        load_recipe(None, ["ppo.algorithm=dpo"])
    with pytest.raises(ConfigError, match="allowed values: grpo, dr_grpo, dapo, bnpo"):
        load_recipe(None, ["ppo.loss_type=sapo"])


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_group_baselines_need_two_samples_per_prompt(algorithm):
    ppo = load_recipe(None, [f"ppo.algorithm={algorithm}", "ppo.num_generations=1"]).ppo  # unset it takes 4
    with pytest.raises(ConfigError, match=f"ppo.num_generations: {algorithm} needs at least 2") as err:
        alg.check_algorithm(ppo)
    assert "\n" not in str(err.value)
    alg.check_algorithm(load_recipe(None, [f"ppo.algorithm={algorithm}", "ppo.num_generations=2"]).ppo)
    alg.check_algorithm(load_recipe(None, ["ppo.algorithm=reinforce_pp"]).ppo)  # a batch baseline: 1 is fine


def test_reference_is_skipped_only_for_critic_free_beta_zero():
    def ppo(*o):
        return load_recipe(None, list(o)).ppo
    assert alg.needs_reference(ppo("ppo.kl_coef=0"))  # PPO keeps kl_coef and always measures KL
    assert alg.needs_reference(ppo("ppo.algorithm=rloo"))
    assert not alg.needs_reference(ppo("ppo.algorithm=rloo", "ppo.beta=0"))
    assert alg.kl_in_loss(ppo("ppo.algorithm=grpo")) and not alg.kl_in_loss(ppo("ppo.algorithm=reinforce_pp"))


# --------------------------------------------------------------------------- advantages
def test_grpo_advantages_per_group_scaled_by_group_batch_or_nothing():
    scores = torch.tensor([1.0, 3.0, 2.0, 2.0])  # two prompts, two samples each; group means 2 and 2
    # group: the first group's std is sqrt(2) (unbiased), the second's is 0 -> advantage 0, not 0/0
    expected = torch.tensor([-1 / (SQRT2 + 1e-4), 1 / (SQRT2 + 1e-4), 0.0, 0.0])
    torch.testing.assert_close(alg.group_advantages(scores, 2, "group"), expected)
    # batch: the whole batch's std, sqrt(2/3), still around each group's mean
    batch_std = math.sqrt(2 / 3)
    torch.testing.assert_close(alg.group_advantages(scores, 2, "batch"),
                               torch.tensor([-1.0, 1.0, 0.0, 0.0]) / (batch_std + 1e-4))
    torch.testing.assert_close(alg.group_advantages(scores, 2, "none"), torch.tensor([-1.0, 1.0, 0.0, 0.0]))


def test_rloo_baseline_leaves_the_sample_out():
    scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    # 1 - (2+3)/2, 2 - (1+3)/2, 3 - (1+2)/2 | 0 - (0+6)/2, 0 - (0+6)/2, 6 - 0
    torch.testing.assert_close(alg.rloo_advantages(scores, 3), torch.tensor([-1.5, 0.0, 1.5, -3.0, -3.0, 6.0]))


def test_group_advantages_reject_a_batch_that_splits_a_group():
    with pytest.raises(ValueError, match="divisible by group_size=2"):
        alg.group_advantages(torch.zeros(3), 2)


MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def test_returns_to_go_sum_the_rest_of_the_response():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]])  # 99 is padding
    torch.testing.assert_close(alg.returns_to_go(rewards, MASK), torch.tensor([[6.0, 5.0, 3.0], [9.0, 5.0, 0.0]]))


def test_reinforce_pp_puts_kl_in_the_reward_then_whitens_returns_over_the_batch():
    scores, kl = torch.tensor([1.0, 0.0]), torch.tensor([[0.1, 0.1, 0.1], [0.2, 0.2, 0.0]])
    advantages, non_score = alg.reinforce_pp_advantages(scores, kl, MASK, kl_coef=1.0)
    # rewards [[-.1, -.1, .9], [-.2, -.2, pad]] -> returns [[.7, .8, .9], [-.4, -.2, pad]]
    returns = [0.7, 0.8, 0.9, -0.4, -0.2]
    mean = sum(returns) / 5  # 0.36
    std = math.sqrt(sum((r - mean) ** 2 for r in returns) / 4)
    expected = torch.tensor([[(r - mean) / std for r in returns[:3]], [*((r - mean) / std for r in returns[3:]), 0.0]])
    torch.testing.assert_close(advantages, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(non_score, -kl * MASK)


def test_critic_free_advantages_spread_the_sequence_advantage_over_its_tokens():
    scores, kl = torch.tensor([1.0, 3.0]), torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])
    grpo, non_score = alg.critic_free_advantages("grpo", scores, kl, MASK, 2, kl_coef=0.1)
    a = 1 / (SQRT2 + 1e-4)
    torch.testing.assert_close(grpo, torch.tensor([[-a, -a, -a], [a, a, 0.0]]))  # KL is GRPO's loss term, not here
    torch.testing.assert_close(non_score, torch.tensor([[-0.05, -0.05, 0.0], [0.0, 0.0, 0.0]]))
    # rloo: KL in the reward first: 1 - 0.1 * 1.0 = 0.9 vs 3 -> advantages -2.1 and 2.1
    rloo, _ = alg.critic_free_advantages("rloo", scores, kl, MASK, 2, kl_coef=0.1)
    torch.testing.assert_close(rloo, torch.tensor([[-2.1, -2.1, -2.1], [2.1, 2.1, 0.0]]))


# --------------------------------------------------------------------------- the loss
def test_clipped_surrogate_clips_higher_with_epsilon_high():
    old = torch.zeros(1, 3)
    logprobs = old + 1.0  # ratio e everywhere
    advantages = torch.tensor([[1.0, -1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    losses, stats = alg.clipped_surrogate(logprobs, old, advantages, mask, 0.2, 0.2)
    # A=1: max(-e, -1.2) = -1.2 (clipped); A=-1: max(e, 1.2) = e (the pessimistic side is never clipped); pad: 0
    torch.testing.assert_close(losses, torch.tensor([[-1.2, math.e, 0.0]]))
    assert stats["clipfrac"].item() == pytest.approx(0.5) and stats["ratio"].item() == pytest.approx(math.e)
    losses, _ = alg.clipped_surrogate(logprobs, old, advantages, mask, 0.2, 0.28)
    torch.testing.assert_close(losses, torch.tensor([[-1.28, math.e, 0.0]]))


def test_reference_kl_is_k3():
    ref = torch.zeros(1, 2)
    logprobs = torch.tensor([[0.0, math.log(2.0)]])
    # exp(ref - lp) - (ref - lp) - 1: 0 where equal; 0.5 + log 2 - 1 at lp = log 2
    torch.testing.assert_close(alg.reference_kl(logprobs, ref, torch.ones(1, 2)),
                               torch.tensor([[0.0, 0.5 + math.log(2.0) - 1.0]]))


LOSSES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 7.0, 7.0]])
LOSS_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize("loss_type,expected", [
    ("grpo", (2.0 + 4.0) / 2),          # row means 2 and 4, then their mean
    ("dr_grpo", 10.0 / (2 * 4)),        # token sum / (rows * max_len=4)
    ("dapo", 10.0 / 4),                 # token sum / tokens
    ("bnpo", 10.0 / 4),
])
def test_loss_types_by_hand_and_their_micro_batch_shares_add_up(loss_type, expected):
    assert alg.normalize_loss(LOSSES, LOSS_MASK, loss_type, max_len=4).item() == pytest.approx(expected)
    tokens = LOSS_MASK.sum()
    shares = sum(alg.loss_share(LOSSES[i:i + 1], LOSS_MASK[i:i + 1], loss_type, 2, tokens, 4) for i in range(2))
    assert shares.item() == pytest.approx(expected)


def test_unknown_loss_type_names_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed values: grpo, dr_grpo, dapo, bnpo"):
        alg.normalize_loss(LOSSES, LOSS_MASK, "sapo", 4)


# --------------------------------------------------------------------------- the PPO guarantees, critic-free
# KL 0 at step 0, micro-batch invariance and exact resume per algorithm are in tests/test_trainer.py; kill -9 then
# resume in tests/test_reliability.py. Here: OOM recovery and two ranks, for every critic-free algorithm.
from test_trainer import CRITIC_FREE, adapter_weights, assert_same, critic_free, make_trainer, mean_token_id  # noqa: E402


@pytest.mark.parametrize("algorithm", CRITIC_FREE)
def test_critic_free_injected_oom_in_every_phase_gives_the_same_weights(tmp_path, algorithm):
    clean = make_trainer(critic_free(tmp_path / "a", algorithm), scorer=mean_token_id)
    oom = make_trainer(critic_free(tmp_path / "b", algorithm), scorer=mean_token_id,
                       oom_injection={"generate": 1, "score": 2, "train": 1})
    clean.train(), oom.train()
    assert {p: r.micro_batch for p, r in oom.runners.items()} == {"generate": 1, "score": 2, "train": 1}
    assert all(r.oom_events for r in oom.runners.values())
    assert oom.value_params == []  # nothing of a critic appeared on the retry path either
    # 8 AdamW steps at lr 1e-3: a lost or doubled micro-batch moves weights by ~1e-3; the smaller micro-batches of the
    # retry only sum in another order (2.6e-5 on 8% of the weights with two threads on this project's CPU machine)
    assert_same(adapter_weights(clean), adapter_weights(oom), atol=1e-4)


TWO_RANKS = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_trainer import adapter_weights, critic_free, make_trainer
from pathlib import Path
trainer = make_trainer(critic_free(Path({run!r}), {algorithm!r}, "ppo.total_steps=2", "ppo.rollout_batch_size=4",
                                   "ppo.normalize_scores=true"))
groups = [trainer.prompt_indices(step)[0].tolist() for step in range(2)]
before = adapter_weights(trainer)
trainer.train()
after = adapter_weights(trainer)
# batch statistics span both ranks: each rank's half of a batch gets the whole batch's advantages
from accelerate.utils import reduce
from lowrank_rlhf.rl import algorithms as alg
rank, total = dist.get_rank(), lambda t: reduce(t, "sum")
scores = torch.arange(8.0) ** 1.5
tokens = torch.arange(24.0).reshape(8, 3).sin()
mask = torch.ones(8, 3)
mask[1, 2:] = mask[6, 1:] = 0
mine = slice(4 * rank, 4 * rank + 4)
batch_error = max(
    (alg.group_advantages(scores[mine], 2, "batch", total)
     - alg.group_advantages(scores, 2, "batch")[mine]).abs().max(),
    (alg.masked_whiten_across_ranks(tokens[mine], mask[mine], total)
     - alg.masked_whiten_across_ranks(tokens, mask)[mine]).abs().max())
torch.save({{"flat": torch.cat([t.flatten() for t in after.values()]), "groups": groups, "batch_error": batch_error,
            "changed": any(not torch.equal(before[k], after[k]) for k in before), "world": dist.get_world_size(),
            "moments": trainer.score_moments.state_dict()}},
           Path({run!r}) / f"rank{{dist.get_rank()}}.pt")
# close the group once both ranks saved, as `lowrank-rlhf train` does: exiting with gloo's threads alive aborted
# rank 0 once in CI (SIGABRT)
from lowrank_rlhf.cli import close_process_group
close_process_group()
"""


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", CRITIC_FREE)
def test_critic_free_two_cpu_ranks_end_with_identical_adapters_and_never_split_a_group(tmp_path, algorithm):
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS.format(tests=str(tests), run=str(tmp_path), algorithm=algorithm))
    port = 29540 + CRITIC_FREE.index(algorithm)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                    str(script)], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300, cwd=tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and all(r["changed"] for r in ranks)
    assert torch.equal(ranks[0]["flat"], ranks[1]["flat"])
    for step in range(2):
        rows = [ranks[r]["groups"][step] for r in (0, 1)]
        for mine in rows:  # each rank holds whole groups: a prompt's 2 samples side by side
            assert mine[0::2] == mine[1::2]
        assert not set(rows[0]) & set(rows[1])  # and no prompt is on both ranks
    assert all(r["batch_error"] < 1e-5 for r in ranks)  # scale_rewards=batch, REINFORCE++ whitening
    # normalize_scores learns from every rank's scores (2 steps x 4 rows x 2 ranks), so the ranks normalise alike
    assert ranks[0]["moments"] == ranks[1]["moments"] and ranks[0]["moments"]["count"] == 16


def test_whitening_across_ranks_with_one_rank_is_masked_whiten():
    x, mask = torch.tensor([[1.0, 2.0, 9.0], [4.0, 0.0, 5.0]]), torch.tensor([[1, 1, 0], [1, 1, 1]])
    expected = alg.masked_whiten(x, mask)
    identity = lambda t: t  # noqa: E731  (a "sum over one rank")
    torch.testing.assert_close(alg.masked_whiten_across_ranks(x, mask, identity), expected)
    assert alg.masked_whiten_across_ranks(x, mask, identity)[0, 2] == 0  # padding stays 0
    scores = torch.tensor([1.0, 3.0, 2.0, 6.0])
    torch.testing.assert_close(alg.group_advantages(scores, 2, "batch", identity),
                               alg.group_advantages(scores, 2, "batch"))


def test_grpo_kl_term_stays_finite_where_padding_logprobs_are_very_low():
    """The stored reference logprobs are 0 on padding, the update's are not: a pad logprob below about -88.7 made
    exp() overflow, and inf * 0 = NaN reached the loss and, through the output mask's backward, the gradient."""
    logprobs = torch.tensor([[-1.0, -0.5, -120.0]], requires_grad=True)
    ref = torch.tensor([[-1.2, -0.4, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    kl = alg.reference_kl(logprobs, ref, mask)
    losses, _ = alg.clipped_surrogate(logprobs, ref, torch.ones(1, 3) * mask, mask, 0.2, 0.28)
    loss = alg.loss_share(losses + 0.1 * kl, mask, "dapo", 1, mask.sum(), 3)
    loss.backward()
    assert torch.isfinite(kl).all() and kl[0, 2] == 0 and torch.isfinite(loss)
    assert torch.isfinite(logprobs.grad).all() and logprobs.grad[0, 2] == 0


def test_mask_truncated_completions_without_stop_tokens_is_refused():
    ppo = PPOConfig(algorithm="grpo", num_generations=2, mask_truncated_completions=True, stop_token=["none"])
    with pytest.raises(ConfigError, match=r"ppo.mask_truncated_completions: with ppo.stop_token=\[none\] no "
                                          r"response has a stop token"):
        alg.check_algorithm(ppo)
    alg.check_algorithm(PPOConfig(algorithm="grpo", num_generations=2, mask_truncated_completions=True))
