"""The typed containers passed between the phases of an RL step (OpenRLHF's `Experience`, smaller).

    Rollout     prompts + sampled responses                       (rollout.py)
    Experience  a rollout + its logprobs, values, scores, KL      (scoring.py), then advantages and returns
    TrainBatch  some rows of an Experience, shared padding trimmed (what one micro-batch of the update reads)

Shapes: B rows, P prompt columns (left-padded), R response columns (right-padded). Per-token tensors are [B, R]
and zero after each response's stop token; per-sequence tensors are [B].
"""

from __future__ import annotations

from dataclasses import dataclass, field

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

    def ending_with(self, eos_id: int) -> torch.Tensor:
        """input_ids with each response's stop token replaced by `eos_id`: SFT and reward sequences always end
        in the tokenizer's eos (data/chat.py), but a rollout may stop at another id (Llama-3.1's <|eom_id|>), and
        the reward model reads its score at that last token."""
        last = self.response_start + self.response_mask.sum(1) - 1  # the stop token, where the row stopped
        rows = self.has_stop.nonzero().flatten()
        ids = self.input_ids.clone()
        ids[rows, last[rows]] = eos_id
        return ids


@dataclass
class Experience:
    """A scored rollout: everything an RL step learns from."""

    rollout: Rollout
    logprobs: torch.Tensor         # [B, R] policy logprobs at sampling time (the "old" policy of the ratio)
    ref_logprobs: torch.Tensor | None  # [B, R] reference (sft) logprobs, same path and temperature; None: beta=0
    values: torch.Tensor | None    # [B, R] V(s_t) before each response token; None without a critic
    kl: torch.Tensor               # [B, R] per-token KL estimate, policy vs reference (0 when not measured)
    raw_scores: torch.Tensor       # [B] the reward sources' weighted sum
    scores: torch.Tensor           # [B] raw_scores after the missing-eos penalty, normalisation and clipping
    non_score_reward: torch.Tensor | None = None  # [B, R] -kl_coef * kl (set with the advantages)
    advantages: torch.Tensor | None = None        # [B, R] whitened
    returns: torch.Tensor | None = None           # [B, R] value targets (PPO only)
    loss_mask: torch.Tensor | None = None         # [B, R] tokens the update learns from; None = mask
    # logprobs (and kl) are written by the update's own forward (algorithms.old_logprobs_from_update)
    logprobs_from_update: bool = False
    # [B] each reward source unweighted, by short name ("learned", "sql_execution", ...): the step's rewards/* metrics
    score_parts: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def mask(self) -> torch.Tensor:
        return self.rollout.response_mask

    @property
    def train_mask(self) -> torch.Tensor:
        return self.mask if self.loss_mask is None else self.loss_mask

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
    response_mask: torch.Tensor    # [n, W] float; the Experience's train_mask
    old_logprobs: torch.Tensor | None  # [n, W]; None: the update's own forward, detached (ratio exactly 1)
    advantages: torch.Tensor       # [n, W]
    old_values: torch.Tensor | None = None    # [n, W] (PPO)
    returns: torch.Tensor | None = None       # [n, W] (PPO)
    ref_logprobs: torch.Tensor | None = None  # [n, W] (GRPO's KL in the loss)

    @classmethod
    def take(cls, exp: Experience, rows: torch.Tensor) -> TrainBatch:
        rollout = exp.rollout
        mask = rollout.attention_mask[rows]
        left, right = trim_columns(mask, rollout.response_start)
        width = right - rollout.response_start

        def cols(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[rows, :width]
        return cls(input_ids=rollout.input_ids[rows, left:right], attention_mask=mask[:, left:right],
                   response_start=rollout.response_start - left, response_mask=cols(exp.train_mask).float(),
                   old_logprobs=None if exp.logprobs_from_update else cols(exp.logprobs),
                   advantages=cols(exp.advantages), old_values=cols(exp.values), returns=cols(exp.returns),
                   ref_logprobs=cols(exp.ref_logprobs))
