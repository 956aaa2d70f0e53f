"""THE chat encoding: how a prompt and an answer become token ids, for every stage.

SFT, reward training, PPO's prompts and evaluation all go through these functions, so the reward model is trained
on exactly the tokens a PPO rollout holds and is read at the same token (the last attended one, eos):

    prompt_ids(tok, prompt)              a prompt as PPO encodes it: a conversation through the chat template with
                                         the assistant turn opened and no extra special tokens (the template has
                                         them); plain text with the tokenizer's usual ones (e.g. LLaMA's BOS)
    encode_example(tok, prompt, answer)  prompt_ids, then the answer's ids, ending with eos and nothing after it,
                                         as a rollout lays them out (its attention mask ends at eos); SFT trains
                                         on the same layout (encode_example_parts), the loss on the answer
    encode_prompts(dataset, tok, ...)    prompt_ids of a whole prompt column, limited to max_prompt_length
    left_pad(batch_ids, pad_id)          a batch of id lists left-padded, so every response starts at one column

A prompt or answer is plain text or a conversation: a list of `{"role": ..., "content": ...}` messages. We do not
use TRL's tokenization of a whole conversation for SFT or the reward model: templates put text after the
assistant's end-of-turn token (ChatML's newline, tiny-llama's too), so the reward would be trained at a token PPO
never scores, and tokenizing prompt + answer as one string merges tokens across the boundary (a plain-text prompt
ending in a space: TRL trains " yes" where the policy, after the prompt's own tokens, must produce "yes").
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import Any

import datasets
import torch
from torch.nn.utils.rnn import pad_sequence

from .errors import DataError


# -------------------------------------------------------------------------------------------------- conversations
def is_conversation(value: Any) -> bool:
    """True for a list of {role, content} messages (TRL's conversational format)."""
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value)


def split_messages(messages: Sequence[dict]) -> tuple[list, list]:
    """A conversation -> (everything before the last assistant turn, [that turn])."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise DataError("a conversation has no assistant message to train on")
    return list(messages[:last]), [messages[last]]


def completion_text(completion: Any) -> str:
    """An answer as text: a string as is; a conversation as the content of its assistant messages (joined by
    newlines), or of all its messages when none is from the assistant; a single message dict as its content."""
    if isinstance(completion, str):
        return completion
    if is_conversation(completion):
        parts = [str(m["content"]) for m in completion if m["role"] == "assistant"]
        return "\n".join(parts if parts else [str(m["content"]) for m in completion])
    if isinstance(completion, dict) and "content" in completion:
        return str(completion["content"])
    raise DataError(f"expected a string or a list of {{role, content}} messages, got {type(completion).__name__}")


# -------------------------------------------------------------------------------------------------------- prompts
def prompt_text(tokenizer, prompt: Any, name: str = "data.prompts", row: int | None = None) -> str:
    """A prompt as text: a conversation through the chat template with the assistant turn opened
    (`add_generation_prompt=True`); plain text unchanged."""
    if isinstance(prompt, str):
        return prompt
    where = f"{name}: row {row}" if row is not None else name
    if not is_conversation(prompt):
        raise DataError(f"{where}: prompt must be a string or a list of {{role, content}} messages, "
                        f"got {type(prompt).__name__}")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{name}: prompts are conversations but the tokenizer has no chat template; "
                        f"use plain-text prompts or a model with a chat template")
    return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer, prompt: Any, name: str = "data.prompts", row: int | None = None) -> list[int]:
    """A prompt's token ids: no extra special tokens after a chat template (a second BOS would be wrong), the
    tokenizer's usual ones (e.g. LLaMA's BOS) for plain text."""
    text = prompt_text(tokenizer, prompt, name, row)
    return list(tokenizer(text, add_special_tokens=isinstance(prompt, str))["input_ids"])


def _prompt_column(dataset: Any, name: str) -> list:
    """The prompts of a Dataset (or dict of columns) with a `prompt` column, or a plain list of prompts."""
    if isinstance(dataset, (datasets.Dataset, dict)):
        columns = dataset.column_names if isinstance(dataset, datasets.Dataset) else list(dataset)
        if "prompt" not in columns:
            raise DataError(f"{name}: missing column 'prompt'; columns found: {', '.join(columns)}")
        return list(dataset["prompt"])
    return list(dataset)


def prompt_texts(dataset: Any, tokenizer, name: str = "data.prompts") -> list[str]:
    """`prompt_text` of every prompt. dataset: a Dataset (or dict of columns) with a `prompt` column, or a list."""
    return [prompt_text(tokenizer, p, name, i) for i, p in enumerate(_prompt_column(dataset, name))]


def encode_prompts(dataset: Any, tokenizer, max_prompt_length: int, long_prompts: str = "truncate",
                   name: str = "data.prompts") -> list[list[int]]:
    """`prompt_ids` of every prompt, at most `max_prompt_length` long (see `_limit_lengths`)."""
    _check_limits(max_prompt_length, long_prompts)
    ids = [prompt_ids(tokenizer, p, name, i) for i, p in enumerate(_prompt_column(dataset, name))]
    return _limit_lengths(ids, max_prompt_length, long_prompts, name, tokenizer.bos_token_id)


def tokenize_prompts(texts: Sequence[str], tokenizer, max_prompt_length: int, long_prompts: str = "truncate",
                     add_special_tokens: bool = False, name: str = "data.prompts") -> list[list[int]]:
    """Token ids of already rendered prompt texts, at most `max_prompt_length` long.

    add_special_tokens=False (the default) adds nothing: text rendered by a chat template already carries the
    template's special tokens. Pass True for raw-text prompts of a model that expects a BOS; `encode_prompts`
    makes this choice per row."""
    _check_limits(max_prompt_length, long_prompts)
    ids = [list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]) for text in texts]
    return _limit_lengths(ids, max_prompt_length, long_prompts, name, tokenizer.bos_token_id)


def _check_limits(max_prompt_length: int, long_prompts: str) -> None:
    if long_prompts not in ("truncate", "error"):
        raise DataError(f"data.long_prompts: {long_prompts!r} is not allowed; allowed values: truncate, error")
    if max_prompt_length < 1:
        raise DataError(f"data.max_prompt_length: {max_prompt_length} is out of range; allowed range: [1, inf]")


def _limit_lengths(ids: list[list[int]], max_len: int, long_prompts: str, name: str,
                   bos_id: int | None = None) -> list[list[int]]:
    """Prompts longer than max_len are cut from the LEFT (the end of a prompt, where the question and the assistant
    turn are, is kept; a leading BOS stays, as the model never saw text without one) with one warning saying how
    many were cut and what a cut loses, or, with long_prompts="error", a DataError naming the longest length and
    the limit."""
    too_long = [len(row) for row in ids if len(row) > max_len]
    if not too_long:
        return ids
    if long_prompts == "error":
        raise DataError(f"{name}: {len(too_long)} of {len(ids)} prompts are longer than data.max_prompt_length="
                        f"{max_len} tokens (longest: {max(too_long)}); raise data.max_prompt_length or set "
                        f"data.long_prompts=truncate")
    warnings.warn(f"{name}: {len(too_long)} of {len(ids)} prompts were longer than data.max_prompt_length={max_len} "
                  f"tokens (longest: {max(too_long)}) and were truncated from the left: their start, with any system "
                  f"prompt or chat-template header, is lost (set data.long_prompts=error to refuse them)", stacklevel=3)
    return [_cut_left(row, max_len, bos_id) if len(row) > max_len else row for row in ids]


def _cut_left(row: list[int], max_len: int, bos_id: int | None) -> list[int]:
    if bos_id is not None and row[0] == bos_id and max_len > 1:
        return [bos_id] + row[len(row) - max_len + 1:]
    return row[-max_len:]


# ----------------------------------------------------------------------------------------------------- examples
def encode_example_parts(tokenizer, prompt: Any, completion: Any) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of prompt + answer laid out as in a PPO rollout: `prompt_ids`, then the answer's
    ids (`completion_text`, no special tokens) ending with eos, where the rollout's attention mask ends and
    RoleModel reads the reward. An empty prompt with a conversation as completion splits that conversation before
    its last assistant turn (earlier turns are the prompt). SFT trains on the answer part, the reward on both."""
    if not prompt and is_conversation(completion):
        prompt, completion = split_messages(completion)
    question = prompt_ids(tokenizer, prompt or "")
    answer = list(tokenizer(completion_text(completion), add_special_tokens=False)["input_ids"])
    if not (question + answer) or (question + answer)[-1] != tokenizer.eos_token_id:
        answer.append(tokenizer.eos_token_id)
    return question, answer


def encode_example(tokenizer, prompt: Any, completion: Any) -> list[int]:
    """`encode_example_parts` as one sequence: the token ids the reward model is trained and read on."""
    question, answer = encode_example_parts(tokenizer, prompt, completion)
    return question + answer


def left_pad(batch_ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists to one length: (input_ids LongTensor [B, T], attention_mask LongTensor [B, T]),
    so that every response starts at column T, as batched generation needs. torch's pad_sequence does the work
    (no tokenizer needed, unlike tokenizer.pad)."""
    if len(batch_ids) == 0:
        empty = torch.zeros((0, 0), dtype=torch.long)
        return empty, empty.clone()
    rows = [torch.as_tensor(list(row), dtype=torch.long) for row in batch_ids]
    input_ids = pad_sequence(rows, batch_first=True, padding_value=pad_id, padding_side="left")
    mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_value=0, padding_side="left")
    return input_ids, mask


# -------------------------------------------------------------------------------------------------------- answers
_SPECIAL_TOKEN = re.compile(r"\s*<\|?/?[\w.-]+\|?>\s*$")  # trailing </s>, <|im_end|>, <|eot_id|>
_EDGE = " \t\r\n\"'`*"
_TRAILING = _EDGE + ".,!?;:"


def normalize_answer(text: Any) -> str:
    """The answer for an exact-match check: stripped, lower-cased, without trailing punctuation, quotes and
    special-token strings such as </s> or <|im_end|>. "Yes." -> "yes", " NO!</s>" -> "no", "yes, it is" stays."""
    text = completion_text(text)
    previous = None
    while previous != text:
        previous = text
        text = _SPECIAL_TOKEN.sub("", text).rstrip(_TRAILING).lstrip(_EDGE)
    return text.lower()
