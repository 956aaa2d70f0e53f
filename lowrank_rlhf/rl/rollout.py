"""Rollout: sample responses to a batch of prompts with the policy adapter.

KV cache on, gradient checkpointing off, no top-k/top-p, and no vocabulary-wide scores kept: the logprobs of the
chosen tokens come from a forward pass afterwards (scoring.py). Sampling is keyed per row (sampling.py), so the
tokens do not depend on how the batch is split into micro-batches or redone after an out-of-memory error.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from ..data import left_pad
from ..memory.runner import MicroBatchRunner
from ..models.roles import RoleModel
from .decoding import StaticDecoder
from .experience import Rollout
from .sampling import KeyedGumbelSampler


def response_mask(responses: torch.Tensor, stop_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ones up to and including the first stop token (TRL's truncate_response), everything if none; and whether
    each row stopped."""
    length = responses.shape[1]
    if stop_id is None:
        return torch.ones_like(responses), torch.zeros(len(responses), dtype=torch.bool, device=responses.device)
    is_stop = responses == stop_id
    has_stop = is_stop.any(dim=1)
    first = torch.where(has_stop, is_stop.float().argmax(dim=1),
                        torch.full_like(has_stop, length - 1, dtype=torch.long))
    positions = torch.arange(length, device=responses.device)
    return (positions[None, :] <= first[:, None]).long(), has_stop


@torch.no_grad()
def sample_rollout(model: RoleModel, prompts: list[list[int]], index: torch.Tensor, keys: torch.Tensor,
                   runner: MicroBatchRunner, response_length: int, temperature: float, stop_id: int | None,
                   decoder: StaticDecoder | None = None, force_length: bool = False) -> Rollout:
    """Responses of `response_length` tokens (right-padded after the stop token) to prompts[index], one key per
    row. `decoder` replaces transformers' generate() with the static-cache loop (decoding.py)."""
    pad_id = model.tokenizer.pad_token_id
    query, query_mask = left_pad([prompts[i] for i in index.tolist()], pad_id)
    query, query_mask = query.to(model.device), query_mask.to(model.device)
    gen_cfg = GenerationConfig(max_new_tokens=response_length, do_sample=False, num_beams=1, use_cache=True,
                               # [] and not None: None would be filled in from the model's own eos
                               eos_token_id=stop_id if stop_id is not None else [], pad_token_id=pad_id,
                               min_new_tokens=response_length if force_length else None)

    def generate(a: int, b: int) -> torch.Tensor:
        sampler = KeyedGumbelSampler(keys[a:b], temperature)
        if decoder is not None:
            with model.generation_mode():
                model.activate("policy")
                return decoder.sample(query[a:b], query_mask[a:b], sampler, response_length, stop_id, pad_id,
                                      force_length)
        out = model.generate("policy", query[a:b], query_mask[a:b], generation_config=gen_cfg,
                             logits_processor=[sampler])
        response = out[:, query.shape[1]:]
        pad = response.new_full((b - a, response_length - response.shape[1]), pad_id)
        return torch.cat([response, pad], dim=1)

    responses = torch.cat(runner.run(len(index), generate), dim=0)
    mask, has_stop = response_mask(responses, stop_id)
    responses = torch.where(mask.bool(), responses, torch.full_like(responses, pad_id))
    return Rollout(input_ids=torch.cat([query, responses], dim=1),
                   attention_mask=torch.cat([query_mask, mask], dim=1), response_start=query.shape[1],
                   response_mask=mask, prompt_index=index, has_stop=has_stop)
