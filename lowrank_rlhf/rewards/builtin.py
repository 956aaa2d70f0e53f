"""The built-in reward functions (TRL's convention: prompts, completions, **columns -> one float each)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..data import completion_text, normalize_answer
from .errors import RewardFunctionError


def exact_yes_no(prompts: Sequence[str], completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 if the completion, normalized (normalize_answer), is exactly "yes" or "no", else 0.0."""
    return [1.0 if normalize_answer(c) in ("yes", "no") else 0.0 for c in completions]


def brevity(prompts: Sequence[str], completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """1 / number of words: 1 word -> 1.0, 2 -> 0.5, 10 -> 0.1; an empty completion -> 0.0 (saying nothing is not
    a short answer). Words are whitespace-separated."""
    return [1.0 / n if (n := len(completion_text(c).split())) else 0.0 for c in completions]


def clickbait_accuracy(prompts: Sequence[str], completions: Sequence[Any], label: Sequence[str] | None = None,
                       **kwargs: Any) -> list[float]:
    """1.0 if the normalized answer equals the row's `label` column ("yes"/"no"), else 0.0."""
    if label is None:
        raise RewardFunctionError("reward function clickbait_accuracy needs a 'label' column in data.prompts "
                                  "(yes/no per prompt)")
    if len(label) != len(completions):
        raise RewardFunctionError(f"reward function clickbait_accuracy got {len(label)} labels for "
                                  f"{len(completions)} completions")
    return [1.0 if normalize_answer(c) == normalize_answer(str(y)) else 0.0 for c, y in zip(completions, label)]
