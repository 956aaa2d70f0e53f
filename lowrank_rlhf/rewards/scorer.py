"""The score of each rollout response: the learned reward adapter and the Python functions, weighted and summed."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from .loading import call_reward_function, combine_scores


def short_name(spec: str) -> str:
    """`lowrank_rlhf.rewards:clickbait_accuracy` -> `clickbait_accuracy` (metric names)."""
    return spec.rsplit(":", 1)[-1].strip()


class Scorer:
    """The score of each response in a rollout: `learned_weight` x the reward adapter + each Python function x its
    weight. `parts` gives every source unweighted (evaluation reports them one by one); calling the scorer gives
    the weighted sum that PPO optimises. `prompt_texts` and `columns` are indexed by the rollout's prompt_index."""

    def __init__(self, model, learned_weight: float, functions: Mapping[str, tuple[Callable, float]],
                 prompt_texts: Sequence[str], columns: Mapping[str, Sequence]):
        self.model, self.learned_weight, self.functions = model, learned_weight, dict(functions)
        self.prompt_texts, self.columns = prompt_texts, columns

    def completions(self, rollout) -> list[str]:
        tok = self.model.tokenizer
        kept = rollout.responses * rollout.response_mask + tok.pad_token_id * (1 - rollout.response_mask)
        return tok.batch_decode(kept, skip_special_tokens=True)

    def parts(self, rollout, runner) -> dict[str, torch.Tensor]:
        parts = {}
        if self.learned_weight:
            ids = rollout.ending_with(self.model.tokenizer.eos_token_id)  # the ending the reward model learned on
            parts["learned"] = self.model.rewards(ids, rollout.attention_mask, runner=runner).cpu()
        if self.functions:
            rows = rollout.prompt_index.tolist()
            completions = self.completions(rollout)
            prompts = [self.prompt_texts[i] for i in rows]
            columns = {k: [v[i] for i in rows] for k, v in self.columns.items()}
            for spec, (fn, _) in self.functions.items():
                parts[spec] = call_reward_function(fn, prompts, completions, name=spec, **columns)
        return parts

    def weights(self) -> dict[str, float]:
        weights = {spec: weight for spec, (_, weight) in self.functions.items()}
        return {"learned": self.learned_weight, **weights} if self.learned_weight else weights

    def combine(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        weights = self.weights()
        return combine_scores({k: v for k, v in parts.items() if k in weights}, weights)

    def __call__(self, rollout, runner) -> torch.Tensor:
        return self.combine(self.parts(rollout, runner))
