"""Sampling that does not depend on how the rollout batch is split.

`generate(do_sample=True)` draws from one global RNG stream, so splitting a batch into micro-batches (or redoing
one after an out-of-memory error) would change every sample and with it the whole PPO step. Instead each row gets
its own key, and each token is the arg-max of logits/temperature plus Gumbel noise hashed from (key, position,
token id): exactly a draw from softmax(logits / temperature) with no top-k and no top-p truncation (either would
bias KL negative), reproducible whatever the micro-batch size, the rank count or a resume.

Why Gumbel-max and not inverting the CDF at one uniform per row (about 3x cheaper here): a micro-batch of another size
computes logits that differ in the last bits, and a CDF's boundaries move by the summed error of every token before
them, so an out-of-memory retry changed the tokens it drew (15 of 128 in `test_algorithms.py`'s OOM test with two
threads); the arg-max changes only when the two best perturbed logits are that close. The noise is made cheap
instead: each token id's hash is computed once per vocabulary and combined with the row's (key, position) hash by
one multiply-xorshift round, 9 tensor operations per token step instead of 21 (63-65 -> 46.5 ms for 32 rows of a
49k vocabulary on one idle CPU core; the uniforms alone 46.5 -> 17 ms, the two float64 logarithms stay).
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

_MASK63 = (1 << 63) - 1
_TOKEN_HASHES: dict[tuple[int, str], torch.Tensor] = {}


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A splitmix64-style finaliser on int64 (wrapping arithmetic), kept to 63 bits so shifts stay logical."""
    x = x & _MASK63
    x = (x ^ (x >> 31)) * 0x5DEECE66D & _MASK63
    x = (x ^ (x >> 29)) * 0x27D4EB2F165667C5 & _MASK63
    x = (x ^ (x >> 32)) * 0x2545F4914F6CDD1D & _MASK63
    return x ^ (x >> 29)


def _token_hashes(vocab_size: int, device: torch.device) -> torch.Tensor:
    """One well-mixed 63-bit hash per token id, computed once per (vocabulary size, device)."""
    key = (vocab_size, str(device))
    if key not in _TOKEN_HASHES:
        ids = torch.arange(vocab_size, device=device, dtype=torch.int64)
        _TOKEN_HASHES[key] = _mix(ids * 0x9E3779B1 + 0x632BE59BD9B4E019)
    return _TOKEN_HASHES[key]


def uniform_noise(keys: torch.Tensor, position: int, vocab_size: int) -> torch.Tensor:
    """[rows, vocab] uniforms in (0, 1) determined by (row key, position, token id) only."""
    seed = _mix(keys.to(torch.int64) * 1_000_003 + position)
    # one multiply-xorshift round over the two hashes: the product's high bits depend on every bit of both
    bits = (seed[:, None] ^ _token_hashes(vocab_size, keys.device)[None, :]) * 0x2545F4914F6CDD1D & _MASK63
    bits = bits ^ (bits >> 29)
    # 53 random bits -> a double in (0, 1); the half-step offset keeps it away from 0 and 1 (log stays finite)
    return ((bits >> 10).to(torch.float64) + 0.5) / float(1 << 53)


class KeyedGumbelSampler(LogitsProcessor):
    """Turns greedy decoding into keyed sampling: argmax(logits / T + Gumbel(key, position)) ~ softmax(logits / T)."""

    def __init__(self, row_keys: torch.Tensor, temperature: float):
        self.row_keys = row_keys
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.perturb(scores, input_ids.shape[1])

    def perturb(self, scores: torch.Tensor, position: int) -> torch.Tensor:
        """logits / T + Gumbel noise for the token at `position` (the sequence length so far, prompt included)."""
        u = uniform_noise(self.row_keys.to(scores.device), position, scores.shape[-1])
        gumbel = -torch.log(-torch.log(u))
        return scores.float() / self.temperature + gumbel.to(torch.float32)

    def choose(self, scores: torch.Tensor, position: int) -> torch.Tensor:
        """[rows] the sampled token ids for the token at `position`."""
        return self.perturb(scores, position).argmax(dim=-1)


def row_keys(seed: int, step: int, prompt_index: torch.Tensor, sample_index: torch.Tensor | None = None
             ) -> torch.Tensor:
    """One key per (run seed, PPO step, prompt row, sample of that prompt): the same row samples the same tokens in
    any micro-batch, and the num_generations samples of one prompt differ (sample 0 keeps the key it had before
    there were several)."""
    key = torch.as_tensor(prompt_index, dtype=torch.int64) + (seed * 1_000_033 + step) * 2_147_483_647
    if sample_index is not None:
        key = key + torch.as_tensor(sample_index, dtype=torch.int64) * 0x5851F42D4C957F2D
    return _mix(key)
