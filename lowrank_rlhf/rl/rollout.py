"""Rollout: sample responses to a batch of prompts with the policy adapter.

KV cache on, gradient checkpointing off, no top-k/top-p, and no vocabulary-wide scores kept: the logprobs of the
chosen tokens come from a forward pass afterwards (scoring.py). Sampling is keyed per row (sampling.py), so the
tokens do not depend on how the batch is split into micro-batches or redone after an out-of-memory error.

Two traps of transformers' generate() are handled here. It fills every field we leave unset from the model's own
`generation_config` (repetition_penalty, no_repeat_ngram_size, suppress_tokens, bad_words_ids, min_length...), and
any of them changes the distribution we sample from, so the PPO ratio would not start at 1 and the KL would be
biased: the model's config is swapped for an empty one during the rollout. And a chat model's turn may end with a
token other than `tokenizer.eos` (Llama-3's <|eot_id|>): the stop tokens are every eos id the model declares plus
the chat template's end-of-turn token.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import GenerationConfig

from ..config import ConfigError
from ..data import left_pad
from ..models.roles import RoleModel
from ..models.runner import MicroBatchRunner
from .decoding import StaticDecoder
from .experience import Rollout
from .sampling import KeyedGumbelSampler

STOP_TOKEN_FORMS = "eos, none, or token strings of the tokenizer (e.g. [<|eot_id|>])"


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant message (<|im_end|>, <|eot_id|>,
    </s>...), found by rendering one; None without a template or when plain text follows."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "\x00lowrank_rlhf\x00"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": marker}], tokenize=False)
    except Exception:  # a template that rejects this conversation: fall back to the eos ids
        return None
    after = text.split(marker, 1)[-1]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return ids[0] if ids and ids[0] in special else None


def stop_token_ids(tokenizer, generation_config, spec: list) -> list[int]:
    """The token ids that end a response, from ppo.stop_token."""
    ids: list[int] = []
    for item in spec:
        if item == "none":
            if len(spec) > 1:
                raise ConfigError(f"ppo.stop_token: none cannot be combined with other stop tokens; allowed: "
                                  f"{STOP_TOKEN_FORMS}")
            return []
        if item == "eos":
            ids += _ids(tokenizer.eos_token_id) + _ids(getattr(generation_config, "eos_token_id", None))
            ids += _ids(end_of_turn_id(tokenizer))
            continue
        token = tokenizer.convert_tokens_to_ids(str(item))
        if token is None or token == tokenizer.unk_token_id and str(item) != tokenizer.unk_token:
            raise ConfigError(f"ppo.stop_token: {item!r} is not a token of the tokenizer; allowed: {STOP_TOKEN_FORMS}")
        ids.append(int(token))
    return sorted(set(ids))


@contextmanager
def neutral_generation_config(causal_lm):
    """Swap the model's own generation_config for an empty one, so generate() fills nothing in from it."""
    saved = causal_lm.generation_config
    causal_lm.generation_config = GenerationConfig()
    try:
        yield
    finally:
        causal_lm.generation_config = saved


def response_mask(responses: torch.Tensor, stop_ids: list[int] | int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ones up to and including the first stop token (TRL's truncate_response), everything if none; and whether
    each row stopped."""
    length = responses.shape[1]
    stop_ids = _ids(stop_ids)
    if not stop_ids:
        return torch.ones_like(responses), torch.zeros(len(responses), dtype=torch.bool, device=responses.device)
    is_stop = torch.isin(responses, torch.tensor(stop_ids, device=responses.device))
    has_stop = is_stop.any(dim=1)
    first = torch.where(has_stop, is_stop.float().argmax(dim=1),
                        torch.full_like(has_stop, length - 1, dtype=torch.long))
    positions = torch.arange(length, device=responses.device)
    return (positions[None, :] <= first[:, None]).long(), has_stop


@torch.no_grad()
def sample_rollout(model: RoleModel, prompts: list[list[int]], index: torch.Tensor, keys: torch.Tensor | None,
                   runner: MicroBatchRunner, response_length: int, temperature: float, stop_ids: list[int],
                   decoder: StaticDecoder | None = None, force_length: bool = False,
                   sample_index: torch.Tensor | None = None, role: str = "policy") -> Rollout:
    """Responses of `response_length` tokens (right-padded after the stop token) to prompts[index], one key per
    row; `keys=None` answers greedily (evaluation). `decoder` replaces generate() with the static-cache loop.
    `force_length` (bench) samples every response to its full length by treating stop tokens as plain tokens: the
    draw stays one from softmax(logits / T), as scoring assumes; blocking them would sample from another one."""
    pad_id = model.tokenizer.pad_token_id
    stop_ids = [] if force_length else stop_ids
    query, query_mask = left_pad([prompts[i] for i in index.tolist()], pad_id)
    query, query_mask = query.to(model.device), query_mask.to(model.device)
    gen_cfg = GenerationConfig(max_new_tokens=response_length, do_sample=False, num_beams=1, use_cache=True,
                               eos_token_id=list(stop_ids), pad_token_id=pad_id, min_new_tokens=0)

    def generate(a: int, b: int) -> torch.Tensor:
        sampler = KeyedGumbelSampler(keys[a:b], temperature) if keys is not None else None
        if decoder is not None and sampler is not None:
            with model.generation_mode():
                model.activate(role)
                return decoder.sample(query[a:b], query_mask[a:b], sampler, response_length, stop_ids, pad_id)
        with neutral_generation_config(model.causal_lm):
            out = model.generate(role, query[a:b], query_mask[a:b], generation_config=gen_cfg,
                                 logits_processor=[sampler] if sampler is not None else [])
        response = out[:, query.shape[1]:]
        pad = response.new_full((b - a, response_length - response.shape[1]), pad_id)
        return torch.cat([response, pad], dim=1)

    responses = torch.cat(runner.run(len(index), generate), dim=0)
    mask, has_stop = response_mask(responses, stop_ids)
    responses = torch.where(mask.bool(), responses, torch.full_like(responses, pad_id))
    return Rollout(input_ids=torch.cat([query, responses], dim=1),
                   attention_mask=torch.cat([query_mask, mask], dim=1), response_start=query.shape[1],
                   response_mask=mask, prompt_index=index, has_stop=has_stop,
                   sample_index=sample_index if sample_index is not None else torch.zeros_like(index))


@torch.no_grad()
def greedy_rollout(model: RoleModel, role: str, prompts: list[list[int]], max_new_tokens: int,
                   micro_batch: int = 16) -> Rollout:
    """Greedy responses of `role` to tokenized prompts, stopping at eos: the one greedy path of `eval`, `generate`,
    `serve` checks and the quickstart's report (the rollout code, so the answers are what RL samples at T -> 0)."""
    stops = stop_token_ids(model.tokenizer, model.causal_lm.generation_config, ["eos"])
    return sample_rollout(model, prompts, torch.arange(len(prompts)), None, MicroBatchRunner("generate", micro_batch),
                          max_new_tokens, 1.0, stops, role=role)


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    kept = rollout.responses * rollout.response_mask + tokenizer.pad_token_id * (1 - rollout.response_mask)
    return tokenizer.batch_decode(kept, skip_special_tokens=True)


def greedy_answers(model: RoleModel, role: str, prompts: list[list[int]], max_new_tokens: int,
                   micro_batch: int = 16) -> list[str]:
    return decode_responses(model.tokenizer, greedy_rollout(model, role, prompts, max_new_tokens, micro_batch))
