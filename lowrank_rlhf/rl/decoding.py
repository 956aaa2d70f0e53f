"""The rollout's decode loop with a fixed-size KV cache, optionally compiled: an alternative to `generate()`.

Eager decoding of a 4-bit base with LoRA adapters is bound by kernel launches and Python, not by memory bandwidth:
every token step walks 32-40 layers x 7 LoRA linears, each a dequantize + matmul + two small matmuls + an add, launched
one by one (165 ms per step for 7B at batch 32 on an H100, 143x the weight-read floor: docs/benchmarks/). With a
`StaticCache` every decode step has the same shapes, so `torch.compile(mode="reduce-overhead")` can record the step
as CUDA graphs and replay them. `ppo.decode` picks the path:

    generate         transformers' generate() with a growing cache (the default)
    static           this loop with a StaticCache, eager (same tokens as generate; the baseline for the next)
    static-compiled  this loop with the step compiled by torch.compile(mode="reduce-overhead")

Sampling is the same keyed draw either way (sampling.py), so the paths give the same tokens wherever the
logits agree; only the kernels' speed and rounding may differ.
"""

from __future__ import annotations

import inspect

import torch
from transformers import StaticCache

from .sampling import KeyedGumbelSampler

DECODE_MODES = ("generate", "static", "static-compiled")


def _cache_argument(model) -> str:
    # transformers renamed `past_key_values` to `cache` (5.2x); the GPU images still carry older 5.x releases
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _last_logits(model, input_ids, attention_mask, position_ids, cache, cache_argument) -> torch.Tensor:
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, logits_to_keep=1, **{cache_argument: cache})
    return out.logits[:, -1]


class StaticDecoder:
    """Samples rollouts for one model. With `compiled`, it keeps the compiled step and its cache between rollouts:
    CUDA graphs are recorded against the cache's addresses, so a new cache per rollout would record them again."""

    def __init__(self, model, compiled: bool = False):
        self.model = model
        self.compiled = compiled
        # fullgraph=False: bitsandbytes and PEFT may break the graph; the pieces between breaks are still captured.
        self.step = torch.compile(_last_logits, mode="reduce-overhead", fullgraph=False) if compiled else _last_logits
        self._cache: tuple[tuple[int, int], StaticCache] | None = None
        self._cache_argument = _cache_argument(model)

    def _cache_for(self, rows: int, total: int) -> StaticCache:
        if self.compiled and self._cache is not None and self._cache[0] == (rows, total):
            cache = self._cache[1]
            cache.reset()
            return cache
        self._cache = None  # drop the old one before allocating: two full KV caches may not fit
        cache = StaticCache(config=self.model.config, max_cache_len=total)
        if self.compiled:
            self._cache = ((rows, total), cache)
        return cache

    @torch.no_grad()
    def sample(self, query: torch.Tensor, query_mask: torch.Tensor, sampler: KeyedGumbelSampler,
               max_new_tokens: int, stop_ids: list[int], pad_id: int) -> torch.Tensor:
        """`max_new_tokens` tokens per left-padded prompt row -> [rows, max_new_tokens], pad after a stop token.

        The attention mask has its final length from the start (ones over the response; causality hides what is not
        written yet), so every decode step has identical shapes.
        """
        try:
            return self._sample(query, query_mask, sampler, max_new_tokens, stop_ids, pad_id)
        except BaseException:
            self._cache = None  # after an out-of-memory error the retry must be able to free it
            raise

    def _sample(self, query, query_mask, sampler, max_new_tokens, stop_ids, pad_id) -> torch.Tensor:
        rows, prompt_len = query.shape
        stops = torch.tensor(list(stop_ids), dtype=torch.long, device=query.device)
        cache = self._cache_for(rows, prompt_len + max_new_tokens)
        mask = torch.cat([query_mask, query_mask.new_ones(rows, max_new_tokens)], dim=1)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        tokens = query.new_full((rows, max_new_tokens), pad_id)
        finished = torch.zeros(rows, dtype=torch.bool, device=query.device)
        logits = _last_logits(self.model, query, mask, positions[:, :prompt_len], cache, self._cache_argument)
        for t in range(max_new_tokens):
            scores = logits.float()  # a copy: a replayed CUDA graph overwrites its output buffer
            chosen = sampler.choose(scores, prompt_len + t)
            chosen = torch.where(finished, torch.full_like(chosen, pad_id), chosen)
            tokens[:, t] = chosen
            if len(stops):
                finished |= torch.isin(chosen, stops)
                if t % 16 == 15 and bool(finished.all()):  # a host sync, so only every 16 steps
                    break
            if t + 1 < max_new_tokens:
                logits = self.step(self.model, chosen[:, None], mask,
                                   positions[:, prompt_len + t:prompt_len + t + 1], cache, self._cache_argument)
        return tokens
