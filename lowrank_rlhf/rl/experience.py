"""The typed containers passed between the phases of an RL step (OpenRLHF's `Experience`, smaller).

    Rollout     prompts + sampled responses                       (rollout.py)
    Experience  a rollout + its logprobs, values, scores, KL      (scoring.py), then advantages and returns
    TrainBatch  some rows of an Experience, shared padding trimmed (what one micro-batch of the update reads)

Shapes: B rows, P prompt columns (left-padded), R response columns (right-padded). Per-token tensors are [B, R]
and zero after each response's stop token; per-sequence tensors are [B].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    """A batch of prompts with their sampled responses. Prompts are left-padded, responses right-padded, so every
    response starts at column `response_start`."""

    input_ids: torch.Tensor        # [B, P + R]
    attention_mask: torch.Tensor   # [B, P + R]; zero on prompt padding and after the stop token
    response_start: int            # P
    response_mask: torch.Tensor    # [B, R]; one up to and including the stop token
    prompt_index: torch.Tensor     # [B] rows of the prompt list
    has_stop: torch.Tensor         # [B] whether the response ended with a stop token
    sample_index: torch.Tensor | None = None  # [B] which of the prompt's num_generations samples the row is

    @property
    def responses(self) -> torch.Tensor:
        return self.input_ids[:, self.response_start:]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class Experience:
    """A scored rollout: everything an RL step learns from."""

    rollout: Rollout
    logprobs: torch.Tensor         # [B, R] policy logprobs at sampling time (the "old" policy of the ratio)
    ref_logprobs: torch.Tensor     # [B, R] reference (sft) logprobs, same code path and temperature
    values: torch.Tensor           # [B, R] V(s_t) before each response token
    kl: torch.Tensor               # [B, R] per-token KL estimate, policy vs reference
    raw_scores: torch.Tensor       # [B] the reward sources' weighted sum
    scores: torch.Tensor           # [B] raw_scores after the missing-eos penalty, normalisation and clipping
    non_score_reward: torch.Tensor | None = None  # [B, R] -kl_coef * kl (set with the advantages)
    advantages: torch.Tensor | None = None        # [B, R] whitened
    returns: torch.Tensor | None = None           # [B, R] value targets

    @property
    def mask(self) -> torch.Tensor:
        return self.rollout.response_mask

    def __len__(self) -> int:
        return len(self.rollout)


def trim_columns(attention_mask: torch.Tensor, response_start: int) -> tuple[int, int]:
    """The column span holding any real token: drops prompt padding on the left and response padding on the right
    that every row shares. Padding only costs compute; dropping it changes no result."""
    used = attention_mask.any(dim=0).nonzero().flatten()
    left = min(int(used[0]), response_start - 1)
    right = max(int(used[-1]) + 1, response_start + 1)
    return left, right


@dataclass
class TrainBatch:
    """Rows of an Experience as one micro-batch of the update reads them: columns no row uses are trimmed."""

    input_ids: torch.Tensor        # [n, T]
    attention_mask: torch.Tensor   # [n, T]
    response_start: int
    response_mask: torch.Tensor    # [n, W] float
    old_logprobs: torch.Tensor     # [n, W]
    old_values: torch.Tensor       # [n, W]
    advantages: torch.Tensor       # [n, W]
    returns: torch.Tensor          # [n, W]

    @classmethod
    def take(cls, exp: Experience, rows: torch.Tensor) -> "TrainBatch":
        rollout = exp.rollout
        mask = rollout.attention_mask[rows]
        left, right = trim_columns(mask, rollout.response_start)
        width = right - rollout.response_start
        return cls(input_ids=rollout.input_ids[rows, left:right], attention_mask=mask[:, left:right],
                   response_start=rollout.response_start - left,
                   response_mask=rollout.response_mask[rows, :width].float(),
                   old_logprobs=exp.logprobs[rows, :width], old_values=exp.values[rows, :width],
                   advantages=exp.advantages[rows, :width], returns=exp.returns[rows, :width])
