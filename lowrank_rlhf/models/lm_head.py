"""From the last hidden states to the logprobs (and entropy) of the response tokens, optionally in chunks of tokens.

With a 128k-152k vocabulary the logits are the largest tensor of a step: fp32 logits of one micro-batch of 16 x 512
response tokens over 152k tokens are 5 GB. `chunk_tokens = K > 0` runs lm_head, the selective log-softmax and the
entropy for at most K tokens at a time, so only K x vocab logits exist at once. Under autograd each chunk runs
inside torch.utils.checkpoint: the backward keeps just the chunk's hidden states and recomputes its logits when it
reaches that chunk, so the backward never holds more than one chunk's logits either. K = 0 is the unchunked path
(one lm_head call for the micro-batch); both give the same numbers up to matmul summation order.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .logits import entropy_from_logits, selective_log_softmax


def _chunk(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
           with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    logits = lm_head(hidden).float() / temperature
    logprobs = selective_log_softmax(logits, targets)
    if not with_entropy:
        return logprobs, None
    with torch.no_grad():  # a statistic, never a loss
        return logprobs, entropy_from_logits(logits)


def token_logprobs(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   chunk_tokens: int = 0, with_entropy: bool = False) -> dict[str, torch.Tensor]:
    """hidden [n, W, H] (the states that predict each response token), targets [n, W] -> {"logprobs": [n, W] fp32,
    "entropy": [n, W] fp32 without grad (with_entropy)}. Logits in float32, divided by the sampling temperature."""
    if chunk_tokens <= 0:
        logprobs, entropy = _chunk(lm_head, hidden, targets, temperature, with_entropy)
        return {"logprobs": logprobs, **({"entropy": entropy} if with_entropy else {})}
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    grad = torch.is_grad_enabled() and hidden.requires_grad
    parts = []
    for h, t in zip(flat_hidden.split(chunk_tokens), flat_targets.split(chunk_tokens)):
        # non-reentrant checkpoint: only h is kept for the backward, the chunk's logits are recomputed there
        parts.append(checkpoint(_chunk, lm_head, h, t, temperature, with_entropy, use_reentrant=False) if grad
                     else _chunk(lm_head, h, t, temperature, with_entropy))
    if not parts:  # no response tokens
        return token_logprobs(lm_head, hidden, targets, temperature, 0, with_entropy)
    out = {"logprobs": torch.cat([p[0] for p in parts]).reshape(targets.shape)}
    if with_entropy:
        out["entropy"] = torch.cat([p[1] for p in parts]).reshape(targets.shape)
    return out
