"""RL health while training: is the policy getting better on data it never trained on, or only at pleasing the
reward model?

Every `ppo.eval_steps` the held-out prompts (data.eval_prompts) are answered greedily and scored by every reward
source one by one: the learned reward, each configured reward function (the training ones and
`rewards.eval_functions`), and the share of the most frequent answer (collapse onto one answer shows up there
first), plus `eval/score`, the weighted score PPO maximises (training sources only). `ppo.best_metric` picks
RUN/best. The over-optimisation alarm fires when, for `ppo.overoptimization_patience` evaluations in a row, the best
metric stayed below its best value while eval/score (what PPO maximises) stayed above its value at that best: the
reward is being hacked.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from ..data import normalize_answer
from ..models.runner import MicroBatchRunner
from ..rewards import Scorer, short_name
from .rollout import sample_rollout

LEARNED = "eval/learned_reward"
SCORE = "eval/score"


@dataclass
class HeldOutEval:
    prompts: list[list[int]]      # token ids of the held-out prompts
    scorer: Scorer                # every source: learned reward, training and eval-only (weight 0) functions
    response_length: int
    stop_ids: list[int]

    def metric_names(self) -> list[str]:
        names = [SCORE] + ([LEARNED] if self.scorer.learned_weight else [])
        return names + [f"eval/{short_name(spec)}" for spec in self.scorer.functions]

    @torch.no_grad()
    def run(self, model, runner: MicroBatchRunner) -> dict[str, float]:
        index = torch.arange(len(self.prompts))
        rollout = sample_rollout(model, self.prompts, index, None, runner, self.response_length, 1.0,
                                 self.stop_ids)
        parts = self.scorer.parts(rollout, runner)
        metrics = {SCORE: float(self.scorer.combine(parts).mean())}
        metrics.update({(LEARNED if name == "learned" else f"eval/{short_name(name)}"): float(v.float().mean())
                        for name, v in parts.items()})
        answers = Counter(normalize_answer(text) for text in self.scorer.completions(rollout))
        metrics["eval/top_answer_share"] = answers.most_common(1)[0][1] / len(self.prompts)
        metrics["eval/response_length"] = float(rollout.response_mask.float().sum(1).mean())
        return metrics


def best_metric_name(configured: str, evaluation: HeldOutEval) -> str:
    """ppo.best_metric, or the first eval function (a verifiable metric), or the learned reward."""
    names = evaluation.metric_names()
    if configured:
        if configured not in names + ["eval/top_answer_share"]:
            from ..config import ConfigError

            raise ConfigError(f"ppo.best_metric: {configured!r} is not an eval metric of this run; allowed values: "
                              f"{', '.join(names)}")
        return configured
    functions = [n for n in names if n not in (SCORE, LEARNED)]
    return functions[0] if functions else SCORE


@dataclass
class OveroptimizationAlarm:
    """Over-optimisation: the watched metric is below its best while the optimised score is above what it was at that
    best. `patience` such evaluations in a row fire the alarm (once; a new best re-arms it)."""

    metric: str
    patience: int
    streak: int = 0
    best: dict = field(default_factory=dict)  # {SCORE: score at the best, metric: best value}

    def update(self, metrics: dict) -> bool:
        """True when this evaluation completes `patience` over-optimised evaluations in a row."""
        if self.metric in (SCORE, LEARNED) or self.metric not in metrics:
            return False
        if not self.best or metrics[self.metric] > self.best[self.metric]:
            self.best, self.streak = {SCORE: metrics[SCORE], self.metric: metrics[self.metric]}, 0
            return False
        hacked = metrics[self.metric] < self.best[self.metric] and metrics[SCORE] > self.best[SCORE]
        self.streak = self.streak + 1 if hacked else 0
        return self.streak == self.patience

    def state_dict(self) -> dict:
        return {"streak": self.streak, "best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.streak, self.best = state["streak"], state["best"]
