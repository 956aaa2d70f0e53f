"""One micro-batch's share of an optimizer step: the policy (and value) losses of PPO and of the critic-free
algorithms, their gradients added to `.grad`, and the averaging of those gradients across data-parallel ranks.

The trainer's `optimizer_step` cuts a minibatch into micro-batches and calls `accumulate` on each; every loss here is
a sum divided by counts of the whole minibatch, so micro-batching never changes the gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from accelerate.utils import reduce

from ..config import PPOConfig
from ..models.roles import RoleModel
from . import algorithms
from .experience import TrainBatch
from .ppo import masked_mean, policy_loss, value_loss


def accumulate(model: RoleModel, ppo: PPOConfig, batch: TrainBatch, policy_params: list, value_params: list,
               kl_coef: float, n_tokens: torch.Tensor, n_rows: int,
               loss_tokens: torch.Tensor, record_logprobs: Callable[[torch.Tensor], None] | None = None
               ) -> dict[str, torch.Tensor]:
    """Losses of one micro-batch as its share of the minibatch's loss. Gradients come from autograd.grad and are
    added to .grad only at the end, so an OOM halfway leaves nothing half-accumulated. Without old logprobs (one
    update per rollout) this forward's own, detached, are the old ones and go to `record_logprobs`."""
    critic = algorithms.has_critic(ppo.algorithm)
    weight = batch.response_mask.sum() / n_tokens  # this micro-batch's share of the minibatch's tokens
    shared = critic and model.critic == "shared"
    out = model.response_logprobs("policy", batch.input_ids, batch.attention_mask, batch.response_start,
                                  ppo.temperature, with_values=shared, with_entropy=True,
                                  chunk_tokens=ppo.logits_chunk_tokens)
    if batch.old_logprobs is None:
        batch = dataclasses.replace(batch, old_logprobs=out["logprobs"].detach())
        if record_logprobs is not None:
            record_logprobs(batch.old_logprobs)
    if critic:  # PPO: the clipped surrogate as a token mean (TRL's PPO), this micro-batch's share of it
        pg_loss, pg_stats = policy_loss(out["logprobs"], batch.old_logprobs, batch.advantages, batch.response_mask,
                                        ppo.cliprange)
        pg_loss = pg_loss * weight
    else:
        pg_loss, pg_stats = critic_free_loss(ppo, out["logprobs"], batch, kl_coef, n_rows, loss_tokens)
    stats = {"policy/approxkl_avg": pg_stats["approxkl"], "policy/clipfrac_avg": pg_stats["clipfrac"],
             "val/ratio": pg_stats["ratio"]}
    if not critic:
        grads = torch.autograd.grad(pg_loss, policy_params)
    else:
        if shared:
            values = out["values"]
        else:
            policy_grads = torch.autograd.grad(pg_loss, policy_params)
            # A separate backward per role: with gradient checkpointing, a backward that spans two roles would
            # recompute the first role's layers under the adapter that is active by then.
            values = model.token_values(batch.input_ids, batch.attention_mask, batch.response_start)
        vf_loss, vf_stats = value_loss(values, batch.old_values, batch.returns, batch.response_mask,
                                       ppo.cliprange_value)
        if shared:
            grads = torch.autograd.grad(pg_loss + ppo.vf_coef * vf_loss * weight, policy_params + value_params)
        else:
            grads = policy_grads + torch.autograd.grad(ppo.vf_coef * vf_loss * weight, value_params)
        stats.update({"loss/value_avg": vf_loss, "val/clipfrac_avg": vf_stats["clipfrac"]})
    for param, grad in zip(policy_params + value_params, grads):
        param.grad = grad if param.grad is None else param.grad + grad
    stats["policy/entropy_avg"] = masked_mean(out["entropy"], batch.response_mask)
    # token-weighted means add up over micro-batches; the loss already is this micro-batch's share
    return {"loss/policy_avg": pg_loss.detach().float(), **{k: v.detach().float() * weight for k, v in stats.items()}}


def critic_free_loss(ppo: PPOConfig, logprobs: torch.Tensor, batch: TrainBatch, kl_coef: float, n_rows: int,
                     loss_tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO/RLOO/REINFORCE++: the clipped surrogate per token (epsilon, epsilon_high), GRPO's beta * KL added per
    token, averaged by loss_type as this micro-batch's share of the minibatch loss (algorithms.py)."""
    high = ppo.epsilon if ppo.epsilon_high is None else ppo.epsilon_high
    losses, stats = algorithms.clipped_surrogate(logprobs, batch.old_logprobs, batch.advantages, batch.response_mask,
                                                 ppo.epsilon, high)
    if algorithms.kl_in_loss(ppo):
        losses = losses + kl_coef * algorithms.reference_kl(logprobs, batch.ref_logprobs, batch.response_mask)
    return algorithms.loss_share(losses, batch.response_mask, ppo.loss_type, n_rows, loss_tokens,
                                 ppo.response_length), stats


def average_grads_across_ranks(params: list, num_processes: int) -> None:
    """Data parallel without wrapping the quantized model in DDP: average the adapters' gradients across ranks, so
    identical initial adapters + identical updates keep every rank's adapters identical."""
    if num_processes == 1:
        return
    for param in params:
        param.grad = reduce(param.grad if param.grad is not None else torch.zeros_like(param), "mean")
