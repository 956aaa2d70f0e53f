"""Scoring a rollout, without gradients: policy and reference logprobs, values, the score of each sequence and the
per-token KL. Rows are grouped by length into micro-batches and the padding they share is trimmed."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import PPOConfig
from ..models.roles import REFERENCE, RoleModel
from ..models.runner import MicroBatchRunner
from ..rewards.scorer import Scorer, short_name
from .algorithms import has_critic, needs_reference, old_logprobs_from_update
from .experience import Experience, Rollout, trim_columns
from .ppo import RunningMoments, kl_penalty, normalize_and_clip_scores

# score_fn(rollout, runner) -> one score per sequence (rewards.Scorer is one: the learned reward and Python
# functions; tests pass plain functions)
ScoreFn = Callable[[Rollout, MicroBatchRunner], torch.Tensor]
RowFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def map_rows(rollout: Rollout, runner: MicroBatchRunner, fn: RowFn) -> torch.Tensor:
    """fn(ids, mask, response_start) -> [n, r, ...] (or [n]) over micro-batches of rows sorted by length, with
    shared padding columns trimmed. Per-token outputs are zero-filled back to full response width (trimmed
    columns are padding everywhere in that micro-batch), and rows return to their original order."""
    order = torch.argsort(rollout.attention_mask.sum(1), stable=True)
    width = rollout.response_mask.shape[1]

    def run(a: int, b: int) -> torch.Tensor:
        rows = order[a:b]
        mask = rollout.attention_mask[rows]
        left, right = trim_columns(mask, rollout.response_start)
        out = fn(rollout.input_ids[rows, left:right], mask[:, left:right], rollout.response_start - left)
        if out.dim() >= 2 and out.shape[1] < width:
            full = out.new_zeros((out.shape[0], width, *out.shape[2:]))
            full[:, :out.shape[1]] = out
            out = full
        return out

    parts = torch.cat(runner.run(len(order), run), dim=0)
    result = torch.empty_like(parts)
    result[order] = parts
    return result


@torch.no_grad()
def score_rollout(model: RoleModel, rollout: Rollout, scorer: ScoreFn, runner: MicroBatchRunner, ppo: PPOConfig,
                  score_moments: RunningMoments,
                  gather_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Experience:
    """Without a critic (grpo, rloo, reinforce_pp) no values; with beta=0 no reference forward either; with one
    update per rollout no policy forward (its logprobs come from the update: `measure_kl` after it).
    `gather_ranks` (accelerate's `gather`; None = one process) pools every rank's scores for normalize_scores."""
    critic, reference_pass = has_critic(ppo.algorithm), needs_reference(ppo)
    from_update = old_logprobs_from_update(ppo)
    temp, shared, chunk = ppo.temperature, critic and model.critic == "shared", ppo.logits_chunk_tokens

    def policy(ids, mask, start):
        out = model.response_logprobs("policy", ids, mask, start, temp, with_values=shared, chunk_tokens=chunk)
        return torch.stack([out["logprobs"], out["values"]], dim=-1) if shared else out["logprobs"]

    def reference(ids, mask, start):
        # exactly the policy's code path, temperature and chunking: KL is 0 while policy == sft
        return model.response_logprobs(REFERENCE, ids, mask, start, temp, chunk_tokens=chunk)["logprobs"]

    if from_update:  # filled by the update (trainer.optimizer_step)
        policy_out = logprobs = torch.zeros(rollout.response_mask.shape, device=rollout.input_ids.device)
    else:
        policy_out = map_rows(rollout, runner, policy)
        logprobs = policy_out[..., 0] if shared else policy_out
    ref_logprobs = map_rows(rollout, runner, reference) if reference_pass else None
    values = (policy_out[..., 1] if shared else map_rows(rollout, runner, model.token_values)) if critic else None
    if isinstance(scorer, Scorer):  # each source apart too, for the step's metrics (TRL's rewards/<name>/mean)
        parts = scorer.parts(rollout, runner)
        raw_scores, parts = scorer.combine(parts), {short_name(k): v.float() for k, v in parts.items()}
    else:  # any callable ScoreFn: only the sum
        raw_scores, parts = scorer(rollout, runner), {}
    raw_scores = raw_scores.float().to(logprobs.device)
    scores = raw_scores
    if ppo.missing_eos_penalty is not None:
        scores = scores - ppo.missing_eos_penalty * (~rollout.has_stop).float()
    if ppo.normalize_scores or ppo.score_clip is not None:
        pooled = gather_ranks(scores) if gather_ranks is not None and ppo.normalize_scores else None
        scores = normalize_and_clip_scores(scores, score_moments if ppo.normalize_scores else None, ppo.score_clip,
                                           pooled)
    mask = rollout.response_mask
    exp = Experience(rollout=rollout, logprobs=logprobs * mask,
                     ref_logprobs=ref_logprobs * mask if reference_pass else None,
                     values=values * mask if critic else None, kl=torch.zeros_like(logprobs), raw_scores=raw_scores,
                     scores=scores, logprobs_from_update=from_update, score_parts=parts)
    return exp if from_update else measure_kl(exp, ppo)


def measure_kl(exp: Experience, ppo: PPOConfig) -> Experience:
    """The per-token KL estimate of exp.logprobs vs the reference; 0 where not measured (beta=0)."""
    if exp.ref_logprobs is not None:
        exp.kl = kl_penalty(exp.logprobs, exp.ref_logprobs, ppo.kl_estimator) * exp.mask
    return exp
