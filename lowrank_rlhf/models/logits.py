"""Logits -> per-token quantities (entropy, the chosen token's log-probability), row-chunked to bound memory.

Used by the LM head (lm_head.py) for every role's forward; pure torch, no model code.
"""

from __future__ import annotations

import torch


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Entropy of the categorical given by ``logits`` ([..., vocab] -> [...]), float32.

    Computed from log_softmax (stable for large logits) and with 0 * log 0 = 0,
    so -inf logits (banned tokens) give no nan. Rows are processed in chunks so
    the float32 copies of a bf16 [batch, len, vocab] tensor stay bounded.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    out = []
    for chunk in flat.split(chunk_size):
        logp = torch.log_softmax(chunk.float(), dim=-1)
        p = logp.exp()
        plogp = torch.where(p > 0, p * logp, torch.zeros((), device=p.device))
        out.append(-plogp.sum(-1))
    if not out:  # zero rows
        return torch.zeros(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    return torch.cat(out).reshape(logits.shape[:-1])


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """``log_softmax(logits)[..., index]`` without a full log-softmax over the vocabulary.

    ``logits`` is [..., vocab], ``index`` is [...] (token ids); result is
    float32 [...]. Gather the chosen logit and subtract the logsumexp, in
    float32 (bf16 logsumexp is too coarse for PPO ratios) and ``chunk_size``
    rows at a time, so at most ``chunk_size x vocab`` float32 values exist at
    once instead of a [batch, len, vocab] log-prob tensor.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_index = index.reshape(-1).to(torch.long)
    out = []
    for lg, ix in zip(flat_logits.split(chunk_size), flat_index.split(chunk_size)):
        lg = lg.float()
        chosen = lg.gather(-1, ix.unsqueeze(-1)).squeeze(-1)
        out.append(chosen - torch.logsumexp(lg, dim=-1))
    if not out:
        return torch.zeros(index.shape, dtype=torch.float32, device=logits.device)
    return torch.cat(out).reshape(index.shape)
