"""The critic-free algorithms as small pure functions: where GRPO, RLOO and REINFORCE++ differ from PPO.

An algorithm differs from PPO in two places only: its advantages (a baseline from the other samples instead of a
critic) and how the update averages its token losses (`loss_type`). Everything else (rollout, scoring, the clipped
surrogate, micro-batching, checkpoints) is the PPO loop's. Where the KL to the reference goes follows the reference
implementations:

    grpo          in the loss: + beta * k3(policy, reference) per token, recomputed every update (TRL GRPOTrainer)
    rloo          in the reward: score - beta * sum_t kl_t, before the leave-one-out baseline (TRL RLOOTrainer)
    reinforce_pp  in the reward, per token: -beta * kl_t on every token + score on the last, returns-to-go,
                  whitened over the batch (OpenRLHF's REINFORCE++)

The per-token advantage of grpo and rloo is the sequence's advantage on every response token. The ratio is clipped
per token for every algorithm (GRPO's form). TRL 1.16's RLOOTrainer clips once per sequence instead, the ratio of
the whole response's probabilities; the two agree at ratio 1 (one update per rollout) and differ once a minibatch
has moved the policy. Shapes as in
experience.py: per-sequence [B], per-token [B, R] with a mask (1 = response token); rows of one prompt are
`group_size` consecutive rows (PPOTrainer.prompt_indices).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# the rules of which algorithm needs what are config-level (the memory planner reads them too); re-exported here
from ..config import (  # noqa: F401
    CRITIC_FREE,
    GROUP_BASELINES,
    ConfigError,
    PPOConfig,
    check_algorithm,
    has_critic,
    kl_in_loss,
    needs_reference,
    old_logprobs_from_update,
)
from .ppo import kl_penalty, masked_mean, masked_whiten, token_rewards

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
STD_EPS = 1e-4  # TRL's: a group whose scores are all equal gets advantage 0, not 0/0


# --------------------------------------------------------------------------- advantages
def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if scores.dim() != 1 or len(scores) % group_size:
        raise ValueError(f"expected [B] scores with B divisible by group_size={group_size}, got {tuple(scores.shape)}")
    return scores.view(-1, group_size)


def zero_std_share(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """TRL's frac_reward_zero_std: the share of prompt groups whose samples all scored alike. Their advantages are 0,
    so a critic-free update learns nothing from them (samples too alike, or a prompt too easy or too hard)."""
    return (_groups(scores, group_size).std(dim=1) < STD_EPS).float().mean()


# A function that sums a tensor over every rank (accelerate's `reduce(t, "sum")`); None = this rank is the batch.
# Group statistics never need it (a prompt's group stays on one rank); batch statistics do, as TRL gathers them.
SumAcrossRanks = Callable[[torch.Tensor], torch.Tensor] | None


def masked_whiten_across_ranks(x: torch.Tensor, mask: torch.Tensor, sum_across_ranks: SumAcrossRanks = None
                               ) -> torch.Tensor:
    """masked_whiten over the masked entries of every rank's batch: mean 0, unbiased variance 1, padding 0.
    Two passes of summed statistics (the ranks' tensors may differ in width, so they are not gathered)."""
    if sum_across_ranks is None:
        return masked_whiten(x, mask)
    mask = mask.to(x.dtype)
    n = sum_across_ranks(mask.sum())
    if n < 2:
        raise ValueError(f"whitening needs at least 2 masked elements over all ranks, got {float(n)}")
    mean = sum_across_ranks((x * mask).sum()) / n
    var = sum_across_ranks((((x - mean) * mask) ** 2).sum()) / (n - 1)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def group_advantages(scores: torch.Tensor, group_size: int, scale_rewards: str = "group",
                     sum_across_ranks: SumAcrossRanks = None) -> torch.Tensor:
    """GRPO: each score minus its prompt group's mean, divided by the (unbiased) std of the group, of the whole
    batch (every rank's), or by nothing (`scale_rewards` group | batch | none, TRL's). [B] -> [B]."""
    grouped = _groups(scores, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale_rewards == "group":
        return centred / (grouped.std(dim=1).repeat_interleave(group_size) + STD_EPS)
    if scale_rewards == "batch":
        if sum_across_ranks is None:
            return centred / (scores.std() + STD_EPS)
        n = sum_across_ranks(torch.tensor(float(len(scores)), device=scores.device))
        mean = sum_across_ranks(scores.sum()) / n
        std = (sum_across_ranks(((scores - mean) ** 2).sum()) / (n - 1)).sqrt()
        return centred / (std + STD_EPS)
    if scale_rewards == "none":
        return centred
    raise ValueError(f"unknown scale_rewards {scale_rewards!r}; allowed values: group, batch, none")


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: each score minus the mean of the other samples of its prompt (leave-one-out). [B] -> [B]."""
    if group_size < 2:
        raise ValueError("rloo_advantages needs group_size >= 2")
    grouped = _groups(scores, group_size)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).reshape(-1)


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_{s >= t} r_s per token (gamma = 1), 0 on padding. [B, R] -> [B, R]."""
    rewards = torch.where(mask.bool(), rewards, torch.zeros((), dtype=rewards.dtype, device=rewards.device))
    return rewards.flip(-1).cumsum(-1).flip(-1) * mask


def reinforce_pp_advantages(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float,
                            sum_across_ranks: SumAcrossRanks = None) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++: rewards -kl_coef * kl on every token plus the score on the last, their returns-to-go, whitened
    over every token of the batch (every rank's). Returns (advantages [B, R], non_score_reward [B, R])."""
    rewards, non_score = token_rewards(scores, kl, mask, kl_coef)
    return masked_whiten_across_ranks(returns_to_go(rewards, mask), mask, sum_across_ranks), non_score


def critic_free_advantages(algorithm: str, scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                           group_size: int, kl_coef: float, scale_rewards: str = "group",
                           sum_across_ranks: SumAcrossRanks = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The advantages of a critic-free algorithm, per token: (advantages [B, R], non_score_reward [B, R]).
    non_score_reward is -kl_coef * kl, the KL's price (in grpo it is paid in the loss, not the reward)."""
    if algorithm == "reinforce_pp":
        return reinforce_pp_advantages(scores, kl, mask, kl_coef, sum_across_ranks)
    non_score = -kl_coef * kl * mask
    if algorithm == "grpo":
        sequence = group_advantages(scores, group_size, scale_rewards, sum_across_ranks)
    elif algorithm == "rloo":
        sequence = rloo_advantages(scores + non_score.sum(1), group_size)
    else:
        raise ValueError(f"unknown critic-free algorithm {algorithm!r}; allowed values: {', '.join(CRITIC_FREE)}")
    return sequence.unsqueeze(1) * mask, non_score


# --------------------------------------------------------------------------- the loss
def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      mask: torch.Tensor, epsilon_low: float, epsilon_high: float
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped surrogate (to minimise), ratio clipped to [1 - epsilon_low, 1 + epsilon_high] (DAPO's
    clip-higher when epsilon_high > epsilon_low). Returns ([B, R] losses, 0 on padding; detached stats as
    ppo.policy_loss's)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    losses = torch.where(mask.bool(), torch.max(unclipped, clipped), torch.zeros((), dtype=ratio.dtype,
                                                                                  device=ratio.device))
    stats = {"clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask).detach(),
             "approxkl": (0.5 * masked_mean(log_ratio**2, mask)).detach(),
             "ratio": masked_mean(ratio, mask).detach()}
    return losses, stats


def reference_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GRPO's per-token KL term, k3 = exp(ref - lp) - (ref - lp) - 1 >= 0 (TRL), 0 on padding.

    The inputs are masked, not only the output: the stored reference logprobs are 0 on padding while the update's
    are not, and a pad logprob below about -88.7 overflows exp() to inf; inf * 0 is NaN in the loss and, through
    the backward of any output mask, in the gradient."""
    keep = mask.bool()
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    return kl_penalty(torch.where(keep, logprobs, zero), torch.where(keep, ref_logprobs, zero), "k3") * mask


def loss_share(losses: torch.Tensor, mask: torch.Tensor, loss_type: str, rows: int | torch.Tensor,
               tokens: torch.Tensor, max_len: int) -> torch.Tensor:
    """This micro-batch's share of the minibatch loss: every loss_type is a sum over rows or tokens divided by a
    count of the whole minibatch (`rows`, `tokens`), so the shares of any split add up to the same loss.

        grpo     sum over rows of (row's token mean) / rows
        dr_grpo  sum of token losses / (rows * max_len)        (max_len = response_length, TRL's constant)
        dapo     sum of token losses / tokens                  (tokens: the caller passes all ranks' count / ranks)
        bnpo     sum of token losses / tokens                  (tokens: this rank's)
    """
    mask = mask.to(losses.dtype)
    if loss_type == "grpo":
        per_row = (losses * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_row.sum() / rows
    if loss_type == "dr_grpo":
        return (losses * mask).sum() / (rows * max_len)
    if loss_type in ("dapo", "bnpo"):
        return (losses * mask).sum() / tokens
    raise ValueError(f"unknown loss_type {loss_type!r}; allowed values: {', '.join(LOSS_TYPES)}")


def normalize_loss(losses: torch.Tensor, mask: torch.Tensor, loss_type: str, max_len: int) -> torch.Tensor:
    """The loss of a whole batch (one rank) under `loss_type`."""
    return loss_share(losses, mask, loss_type, losses.shape[0], mask.sum().clamp(min=1.0), max_len)
