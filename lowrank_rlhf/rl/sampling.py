"""Sampling that does not depend on how the rollout batch is split.

`generate(do_sample=True)` draws from one global RNG stream, so splitting a batch into micro-batches (or redoing
one after an out-of-memory error) would change every sample and with it the whole PPO step. Instead each row gets
its own key, and each token is drawn by inverting the row's CDF of softmax(logits / temperature) at one uniform
hashed from (key, position): exactly a draw from that distribution with no top-k and no top-p truncation (either
would bias KL negative), reproducible whatever the micro-batch size, the rank count or a resume.

Why inversion and not Gumbel-max (argmax of logits/T plus noise hashed per token id): both are exact, but Gumbel-max
needs a hash and two logarithms for every vocabulary entry of every row at every token step, 58 ms per step for 32
rows of a 49k vocabulary on one CPU core (13% of SmolLM2's decode step); inversion needs one uniform per row, a
softmax and a cumulative sum (16 ms), and on a GPU a handful of kernels instead of about twenty-five.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

_MASK63 = (1 << 63) - 1


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A splitmix64-style finaliser on int64 (wrapping arithmetic), kept to 63 bits so shifts stay logical."""
    x = x & _MASK63
    x = (x ^ (x >> 31)) * 0x5DEECE66D & _MASK63
    x = (x ^ (x >> 29)) * 0x27D4EB2F165667C5 & _MASK63
    x = (x ^ (x >> 32)) * 0x2545F4914F6CDD1D & _MASK63
    return x ^ (x >> 29)


def row_uniforms(keys: torch.Tensor, position: int) -> torch.Tensor:
    """[rows] float64 uniforms in (0, 1) determined by (row key, position) only."""
    bits = _mix(keys.to(torch.int64) * 1_000_003 + position)
    # 53 random bits -> a double in (0, 1); the half-step offset keeps it away from 0 and 1
    return ((bits >> 10).to(torch.float64) + 0.5) / float(1 << 53)


def keyed_choice(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """[rows] token ids: row r's draw from softmax(logits[r]) at uniform u[r] (the first token whose CDF reaches
    u). Tokens at -inf have probability 0 and are never chosen. The CDF is summed in float64 so the tail of a 49k
    vocabulary keeps its mass."""
    cdf = torch.softmax(logits.float(), dim=-1).cumsum(dim=-1, dtype=torch.float64)
    target = uniforms.to(cdf.device)[:, None] * cdf[:, -1:]  # the sum is 1 up to rounding: scale u to it
    return torch.searchsorted(cdf, target).squeeze(-1).clamp(max=logits.shape[-1] - 1)


class KeyedSampler(LogitsProcessor):
    """Turns greedy decoding into keyed sampling: the scores it returns are 0 at the token drawn from
    softmax(logits / T) with the row's key and -inf elsewhere, so generate()'s arg-max picks that token."""

    def __init__(self, row_keys: torch.Tensor, temperature: float):
        self.row_keys = row_keys
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.perturb(scores, input_ids.shape[1])

    def choose(self, scores: torch.Tensor, position: int) -> torch.Tensor:
        """[rows] the sampled token ids for the token at `position` (the sequence length so far, prompt included)."""
        return keyed_choice(scores.float() / self.temperature, row_uniforms(self.row_keys, position))

    def perturb(self, scores: torch.Tensor, position: int) -> torch.Tensor:
        """Scores whose arg-max is the sampled token (what a LogitsProcessor in greedy generate() must return)."""
        chosen = self.choose(scores, position)
        out = torch.full_like(scores, float("-inf"), dtype=torch.float32)
        return out.scatter_(1, chosen[:, None], 0.0)


def row_keys(seed: int, step: int, prompt_index: torch.Tensor, sample_index: torch.Tensor | None = None
             ) -> torch.Tensor:
    """One key per (run seed, PPO step, prompt row, sample of that prompt): the same row samples the same tokens in
    any micro-batch, and the num_generations samples of one prompt differ (sample 0 keeps the key it had before
    there were several)."""
    key = torch.as_tensor(prompt_index, dtype=torch.int64) + (seed * 1_000_033 + step) * 2_147_483_647
    if sample_index is not None:
        key = key + torch.as_tensor(sample_index, dtype=torch.int64) * 0x5851F42D4C957F2D
    return _mix(key)
