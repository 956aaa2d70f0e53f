"""PPO math for RLHF as small pure torch functions (no model code).

Semantics follow "The N+ implementation details of RLHF with PPO" (Huang et al.)
and TRL's PPO trainer, so numbers can be compared with theirs. Every per-token
tensor is ``[batch, response_len]`` and comes with a ``mask`` (float or bool,
1 = real response token, 0 = right padding). Padding never contributes to a
statistic or a loss, and anything we return is 0 at padded positions, so a
caller cannot pick up garbage from the padding by accident.

The functions here are deliberately free of state and of model code so that
each one can be tested on tensors computed by hand (tests/test_ppo.py). The
only stateful pieces are the KL controllers and ``RunningMoments``; both have
``state_dict``/``load_state_dict`` so a resumed run continues exactly.
"""

from __future__ import annotations

import math

import torch

# per-token quantities from logits live with the model code that produces them; re-exported for PPO's callers
from ..models.logits import entropy_from_logits, selective_log_softmax

__all__ = [
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "kl_penalty",
    "token_rewards",
    "gae",
    "policy_loss",
    "value_loss",
    "entropy_from_logits",
    "selective_log_softmax",
    "FixedKLController",
    "AdaptiveKLController",
    "RunningMoments",
    "normalize_and_clip_scores",
]

KL_ESTIMATORS = ("k1", "k3")


# --------------------------------------------------------------------------- #
# Masked statistics
# --------------------------------------------------------------------------- #
def _zero_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # torch.where, not x * mask: padded positions may hold inf/nan (e.g. the
    # ratio of two garbage logprobs) and inf * 0 = nan would poison the sum.
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is non-zero (mask-weighted).

    ``dim=None`` reduces over everything (a token-level mean over the batch, as
    TRL does); an integer reduces along that dimension only.
    """
    mask = mask.to(x.dtype) if mask.dtype == torch.bool else mask
    num = (_zero_padding(x, mask) * mask).sum() if dim is None else (_zero_padding(x, mask) * mask).sum(dim)
    den = mask.sum() if dim is None else mask.sum(dim)
    # An all-padding row gives 0 rather than 0/0 = nan.
    return num / den.clamp_min(torch.finfo(num.dtype).tiny)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the masked positions (all of them, one scalar)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            # Bessel's correction needs two samples; nan/inf here would only
            # surface steps later as a nan loss.
            raise ValueError(f"masked_var(unbiased=True) needs at least 2 masked elements, got {float(n)}")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise ``x`` to mean 0 / variance 1 over the masked positions (as TRL).

    ``shift_mean=False`` adds the mean back, i.e. only rescales: used for
    rewards, whose sign carries meaning. Padded positions come back as 0.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_padding(whitened, mask)


# --------------------------------------------------------------------------- #
# KL and rewards
# --------------------------------------------------------------------------- #
def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled-token logprobs.

    - ``"k1"``: ``logprobs - ref_logprobs``. Unbiased but can be negative per
      token (and on average, if sampling settings bias the rollout).
    - ``"k3"``: ``(r - 1) - log r`` with ``r = exp(ref - logprobs)``. Also
      unbiased for samples from the policy, lower variance, and >= 0 for every
      token (Schulman, "Approximating KL divergence").
    """
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k3":
        logr = ref_logprobs - logprobs
        # expm1 keeps precision when the policy is close to the reference,
        # which is exactly the regime PPO works in (exp(x) - 1 cancels badly).
        return torch.expm1(logr) - logr
    raise ValueError(f"unknown KL estimator {estimator!r}; allowed values: {', '.join(KL_ESTIMATORS)}")


def _last_real_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row ([batch]); -1 for an empty row."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, -1).max(dim=-1).values


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: ``-kl_coef * kl`` everywhere, plus the reward model's
    scalar ``score`` ([batch]) on the last real token of each row.

    The score goes on the *last real* token, not the last column: with right
    padding the last column is padding for shorter rows and GAE would never
    propagate a reward placed there. Returns ``(rewards, non_score_reward)``.
    """
    non_score_reward = _zero_padding(-kl_coef * kl, mask)
    last = _last_real_index(mask)
    if (last < 0).any():
        # An empty response would silently drop its score; EOS counts as a
        # real token, so every sampled response should have at least one.
        raise ValueError("token_rewards: a row has no real response token (mask all zero)")
    rewards = non_score_reward.clone()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards, non_score_reward


# --------------------------------------------------------------------------- #
# Advantages
# --------------------------------------------------------------------------- #
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), reverse in time.

    ``delta_t = r_t + gamma * V_{t+1} - V_t``, ``A_t = delta_t + gamma * lam * A_{t+1}``.
    Positions past the end of a row (mask 0) are terminal: their value is 0
    and they contribute nothing, so the last real token bootstraps from 0.
    Returns ``(advantages, returns)`` with ``returns = advantages + values``
    (the value-function target), both 0 on padding. Advantages are *not*
    whitened here; the caller does that (``masked_whiten``) after computing
    the returns, as TRL does.
    """
    values = _zero_padding(values, mask)
    rewards = _zero_padding(rewards, mask)
    m = mask.to(values.dtype)
    T = rewards.shape[-1]
    advantages = torch.zeros_like(values)
    last_gae = torch.zeros_like(values[..., 0])
    for t in reversed(range(T)):
        next_value = values[..., t + 1] if t + 1 < T else torch.zeros_like(last_gae)
        delta = rewards[..., t] + gamma * next_value - values[..., t]
        # With right padding, zeroed values/rewards already make delta 0 past
        # the end; the mask also keeps "0 where mask is 0" true for any mask
        # (a masked position becomes an episode boundary, nothing leaks across).
        last_gae = (delta + gamma * lam * last_gae) * m[..., t]
        advantages[..., t] = last_gae
    returns = _zero_padding(advantages + values, mask)
    return advantages, returns


# --------------------------------------------------------------------------- #
# Losses
# --------------------------------------------------------------------------- #
def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss (to minimise), token-level masked mean.

    The max of the two negated objectives is the pessimistic bound: clipping
    only ever removes incentive to move the ratio further from 1, never adds.
    Stats (detached): ``clipfrac`` (fraction of tokens where the clipped term
    won), ``approxkl`` (0.5 * mean((lp - old)^2)), ``ratio`` (mean ratio).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(pg_losses, pg_losses_clipped), mask)
    stats = {
        "clipfrac": masked_mean((pg_losses_clipped > pg_losses).to(loss.dtype), mask).detach(),
        "approxkl": (0.5 * masked_mean(log_ratio**2, mask)).detach(),
        "ratio": masked_mean(ratio, mask).detach(),
    }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: ``0.5 * mean(max((v - R)^2, (clip(v, old +- c) - R)^2))``.

    Clipping the value around the rollout-time estimate keeps the critic from
    jumping in one update (Huang et al. detail; also TRL). Stats (detached):
    ``clipfrac``, the fraction of tokens where the clipped term was larger.
    """
    # torch.min/max rather than clamp(tensor bounds) so this runs on older torch too.
    values_clipped = torch.max(torch.min(values, old_values + cliprange_value), old_values - cliprange_value)
    vf_losses = (values - returns) ** 2
    vf_losses_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(vf_losses, vf_losses_clipped), mask)
    stats = {"clipfrac": masked_mean((vf_losses_clipped > vf_losses).to(loss.dtype), mask).detach()}
    return loss, stats


# --------------------------------------------------------------------------- #
# KL coefficient controllers
# --------------------------------------------------------------------------- #
class FixedKLController:
    """Constant KL coefficient (``update`` is a no-op)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning LMs from Human Preferences").

    Proportional control towards ``target`` KL: the error is clipped to
    +-0.2 so one noisy batch cannot swing the coefficient, and scaled by
    ``n_steps / horizon`` (n_steps = samples in the batch).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])


# --------------------------------------------------------------------------- #
# Reward-score normalisation
# --------------------------------------------------------------------------- #
class RunningMoments:
    """Running mean/variance of all values seen, merged batch by batch (Chan et al.).

    Stores count, mean and M2 (sum of squared deviations), which merge exactly,
    so the result equals the statistics of the concatenation of all batches.
    ``var``/``std`` are the unbiased sample estimates; before two values have
    been seen they are 1.0 (a neutral scale, as TRL initialises std to 1).
    """

    def __init__(self):
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    @property
    def var(self) -> float:
        return self.m2 / (self.count - 1) if self.count > 1 else 1.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> tuple[float, float]:
        """Merge ``x`` (any shape) in; return this batch's (mean, unbiased std)."""
        x = x.detach().double().reshape(-1)
        n = x.numel()
        if n == 0:
            return self.mean, self.std
        b_mean = x.mean().item()
        b_m2 = ((x - b_mean) ** 2).sum().item()
        total = self.count + n
        delta = b_mean - self.mean
        self.mean += delta * n / total
        self.m2 += b_m2 + delta**2 * self.count * n / total
        self.count = total
        return b_mean, (math.sqrt(b_m2 / (n - 1)) if n > 1 else 0.0)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self.m2 = float(state["m2"])


def normalize_and_clip_scores(
    scores: torch.Tensor, running: RunningMoments | None, clip: float | None, pooled: torch.Tensor | None = None
) -> torch.Tensor:
    """Optionally normalise reward-model scores with running statistics, then clip.

    With ``running``, the batch is merged into the running moments *first*
    (so the first batch is normalised by its own statistics) and scores become
    ``(s - mean) / (std + eps)``: this keeps the score on a stable scale
    relative to the KL penalty as the reward model's output drifts. ``clip``
    bounds outliers to ``[-clip, clip]``. ``pooled`` (every data-parallel
    rank's scores) is what the moments learn from instead of ``scores``, so
    every rank normalises alike. Returns a new tensor.
    """
    out = scores
    if running is not None:
        running.update(scores if pooled is None else pooled)
        eps = torch.finfo(scores.dtype).eps if scores.is_floating_point() else 1e-8
        out = (out - running.mean) / (running.std + eps)
    if clip is not None:
        if clip <= 0:
            raise ValueError(f"score clip must be > 0, got {clip}")
        out = torch.clamp(out, -clip, clip)
    return out.clone() if out is scores else out
