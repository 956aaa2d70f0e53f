"""The PPO loop. `train_step` tells one step top to bottom: rollout -> score -> advantages -> update -> metrics.

The critic-free algorithms (ppo.algorithm: grpo, rloo, reinforce_pp) run the same loop without a value role; they
differ only in their advantages and how the update averages its token losses (algorithms.py).

One quantized base plays every role through its adapters (models/roles.py). Every phase runs in micro-batches
chosen by the memory planner; an out-of-memory error halves that phase's micro-batch and redoes the same rows, and
because sampling is keyed per row (sampling.py) and losses are token-weighted sums, the result never depends on
the micro-batch size. Config and metric names follow TRL's PPOTrainer so its users feel at home. A micro-batch's
losses and gradients are in update.py, the optimizer choice (ppo.optim) in optim.py.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather, reduce
from transformers import get_scheduler

from ..config import ConfigError, RecipeConfig, to_dict
from ..memory import PHASES
from ..models.roles import RoleModel
from ..models.runner import MicroBatchRunner
from ..run import resume_guard
from ..run.signals import STOP_SIGNALS, Interrupted
from . import algorithms, update
from . import state as run_state
from .decoding import StaticDecoder
from .experience import Experience, Rollout, TrainBatch
from .health import HeldOutEval, OveroptimizationAlarm, best_metric_name
from .optim import build_optimizer, turn_off_dropout
from .ppo import AdaptiveKLController, FixedKLController, RunningMoments, gae, masked_whiten, token_rewards
from .reporting import MetricsLog
from .rollout import sample_rollout, stop_token_ids
from .sampling import row_keys
from .scoring import ScoreFn, measure_kl, score_rollout
from .timing import PhaseClock

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many PPO updates in a row had NaN/inf losses or gradients."""


class PPOTrainer:
    """PPO with LoRA roles on one base. `scorer(rollout, runner)` returns one score per sequence."""

    def __init__(self, model: RoleModel, cfg: RecipeConfig, prompts: list[list[int]], scorer: ScoreFn,
                 run_dir: str | Path | None = None, micro_batches: dict | None = None,
                 oom_injection: dict | None = None, force_response_length: bool = False,
                 show_progress: bool = True, on_step: Callable[[dict], None] | None = None,
                 evaluation: HeldOutEval | None = None):
        if not prompts:
            raise ConfigError("data.prompts: PPO needs at least one prompt")
        self.model, self.cfg, self.ppo = model, cfg, cfg.ppo
        self.prompts, self.scorer = prompts, scorer
        self.run_dir = Path(run_dir or cfg.run_dir)
        self.force_response_length = force_response_length
        self.show_progress, self.on_step = show_progress, on_step
        # cpu=True: without it accelerate reports one process under torchrun on a CPU-only machine, and every
        # rank would silently train alone on the same prompts
        self.state = PartialState(cpu=model.device.type == "cpu")
        algorithms.check_algorithm(self.ppo)
        self.critic = algorithms.has_critic(self.ppo.algorithm)
        if not self.critic and ("value" in model.roles or "value" in model.heads or model.critic == "shared"):
            raise ValueError(f"ppo.algorithm={self.ppo.algorithm} trains no critic: build the model without a value "
                             f"role or head, with lora.critic=separate (pipeline.load_roles does)")
        for key in ("num_mini_batches", "num_generations"):
            if self.ppo.rollout_batch_size % getattr(self.ppo, key):
                raise ConfigError(f"ppo.rollout_batch_size ({self.ppo.rollout_batch_size}) must be divisible by "
                                  f"ppo.{key} ({getattr(self.ppo, key)})")
        self.stop_ids = stop_token_ids(model.tokenizer, model.causal_lm.generation_config, self.ppo.stop_token)
        turn_off_dropout(model)
        micro_batches, oom_injection = micro_batches or {}, oom_injection or {}
        self.runners = {p: MicroBatchRunner(p, micro_batches.get(p, self.ppo.rollout_batch_size),
                                            inject_oom_above=oom_injection.get(p)) for p in PHASES}
        # The value head trains at value_learning_rate also when it sits on the policy adapter (critic: shared).
        head = list(model.heads["value"].parameters()) if "value" in model.heads else []
        self.policy_params = [p for p in model.role_parameters("policy") if all(p is not h for h in head)]
        self.value_params = ([] if not self.critic else head if model.critic == "shared"
                             else model.role_parameters("value"))
        groups = [{"params": self.policy_params, "lr": self.ppo.learning_rate}]
        if self.value_params:
            groups.append({"params": self.value_params, "lr": self.ppo.value_learning_rate})
        self.optimizer = build_optimizer(groups, self.ppo)  # ppo.optim: adamw, or bitsandbytes' 8-bit states
        updates = self.ppo.total_steps * self.ppo.num_ppo_epochs * self.ppo.num_mini_batches
        self.scheduler = get_scheduler(self.ppo.lr_scheduler_type, self.optimizer, num_warmup_steps=0,
                                       num_training_steps=updates)
        # PPO's kl_coef (adaptive if asked); the critic-free algorithms' beta, fixed as in TRL
        self.kl_ctl = (FixedKLController(self.ppo.beta) if not self.critic
                       else AdaptiveKLController(self.ppo.kl_coef, self.ppo.kl_target, self.ppo.kl_horizon)
                       if self.ppo.adaptive_kl else FixedKLController(self.ppo.kl_coef))
        self.score_moments = RunningMoments()
        self.decoder = (StaticDecoder(model.causal_lm, compiled=self.ppo.decode == "static-compiled")
                        if self.ppo.decode != "generate" else None)
        self.clock = PhaseClock(model.device)
        self.metrics_log = MetricsLog(self.run_dir, self.ppo.report_to, to_dict(cfg))
        self.evaluation = evaluation
        if evaluation is not None:
            self.best_metric = best_metric_name(self.ppo.best_metric, evaluation)
            self.alarm = OveroptimizationAlarm(self.best_metric, self.ppo.overoptimization_patience)
        self.best: dict | None = None  # {"step", "metric", "value"} of RUN/best
        self.step = 0
        self.nan_skips = 0
        self._orders: dict[int, torch.Tensor] = {}  # epoch_order's last pass (a step spans at most a few)
        self._interrupted = 0  # the signal that asked the run to stop

    # ================================================================================== the loop
    def train(self) -> list[dict]:
        """Run PPO to `total_steps`, checkpointing every `save_steps`, at the end and on Ctrl-C or SIGTERM."""
        if self.ppo.resume:
            self.resume()
        history = []
        progress = self._progress()
        on_main_thread = threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS} if on_main_thread else {}
        try:
            if self.step == 0 and self._evaluation_due():  # the starting point: an eval line, not a step
                self.log_metrics(self.evaluate(), step=False)
            while self.step < self.ppo.total_steps:
                metrics = self.train_step()
                history.append(metrics)
                progress.update(1)
                progress.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
                if self._interrupted:
                    self.save_checkpoint()
                    raise Interrupted(self._interrupted, f"the RL stage saved its checkpoint at step {self.step}; "
                                      "rerun the same command with ppo.resume=true to continue it")
                if self._stop_for_overoptimization(metrics):
                    break
                if self.ppo.save_steps and self.step % self.ppo.save_steps == 0:
                    self.save_checkpoint()
            self.save_checkpoint()
            self.save_adapters()
        finally:
            progress.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return history

    # ================================================================================== one step, the story
    def train_step(self) -> dict:
        """One PPO step."""
        ppo = self.ppo
        self.clock.last.clear()
        # 1. Rollout: this step's prompts, num_generations responses each, sampled from the policy adapter.
        with self.clock.phase("generate"):
            rollout = self.rollout()
        # 2. Score, without gradients: policy and reference logprobs, values, the reward sources, per-token KL.
        with self.clock.phase("score"):
            exp = self.score(rollout)
        # 3. Advantages: -kl_coef * KL on every token plus the score on the last one, GAE, whitening (PPO); or
        #    a baseline from the other samples (critic-free, algorithms.py).
        exp = self.advantages(exp)
        # 4. Update: num_ppo_epochs passes over shuffled minibatches; each minibatch is one optimizer step.
        with self.clock.phase("train"):
            updates = [self.optimizer_step(exp, rows) for epoch in range(ppo.num_ppo_epochs)
                       for rows in self.minibatches(len(rollout), epoch)]
        if exp.logprobs_from_update:  # the score phase skipped the policy forward; the update wrote its logprobs
            exp = measure_kl(exp, ppo)
        # 5. The KL controller follows the measured KL; then the step's metrics, gathered in one host sync.
        self.step += 1
        metrics = self.metrics(exp, updates)
        self.kl_ctl.update(metrics["objective/kl"], len(rollout) * self.state.num_processes)
        metrics["kl_coef"] = self.kl_ctl.value  # the coefficient the next step uses
        if metrics["policy/loss_token_share"] == 0:
            log.warning("step %d learned nothing: no response ended with a stop token within ppo.response_length=%d "
                        "and ppo.mask_truncated_completions is on; raise ppo.response_length or turn it off",
                        self.step, ppo.response_length)
        # 6. Every eval_steps: the held-out prompts, answered greedily and scored by every source (health.py).
        if self._evaluation_due():
            metrics.update(self.evaluate())
        self.log_metrics(metrics)
        return metrics

    def prompt_indices(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows for `step` as (prompt index, sample index). The prompts are walked in a shuffled order,
        reshuffled every pass over the table (epoch), disjoint across ranks; each prompt num_generations times in a
        row. The sample index counts a prompt's samples within the step (all ranks'): 0..G-1, and G.. when the step
        needs more prompts than the table has and meets a prompt again, so the repeat gets its own sampling key
        instead of the same key and identical responses."""
        g, ranks = self.ppo.num_generations, self.state.num_processes
        b, n = self.ppo.rollout_batch_size // g, len(self.prompts)
        draws = torch.arange(b) + (step * ranks + self.state.process_index) * b  # positions in the endless walk
        epochs = draws // n
        prompts = torch.stack([self.epoch_order(int(e))[int(d) % n] for d, e in zip(draws, epochs)])
        repeat = epochs - step * ranks * b // n  # 0 unless a pass over the table began earlier in this step
        return prompts.repeat_interleave(g), (repeat.repeat_interleave(g) * g + torch.arange(g).repeat(b))

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The shuffled prompt order of one pass over the table (the first pass keeps the order runs had before)."""
        if epoch not in self._orders:
            seed = self.cfg.seed if epoch == 0 else self.cfg.seed * 1_000_003 + epoch * 7_919
            self._orders = {epoch: torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(seed))}
        return self._orders[epoch]

    def rollout(self) -> Rollout:
        index, sample = self.prompt_indices(self.step)
        return sample_rollout(self.model, self.prompts, index, row_keys(self.cfg.seed, self.step, index, sample),
                              self.runners["generate"], self.ppo.response_length, self.ppo.temperature,
                              self.stop_ids, self.decoder, self.force_response_length, sample_index=sample)

    def score(self, rollout: Rollout) -> Experience:
        return score_rollout(self.model, rollout, self.scorer, self.runners["score"], self.ppo, self.score_moments,
                             gather if self.state.num_processes > 1 else None)

    def advantages(self, exp: Experience) -> Experience:
        ppo = self.ppo
        # mask_truncated_completions: a response without a stop token still counts in the baselines, adds no loss
        loss_mask = exp.mask * exp.rollout.has_stop.unsqueeze(1) if ppo.mask_truncated_completions else None
        if not self.critic:
            advantages, non_score = algorithms.critic_free_advantages(
                ppo.algorithm, exp.scores, exp.kl, exp.mask, ppo.num_generations, self.kl_ctl.value, ppo.scale_rewards,
                sum_across_ranks=(lambda t: reduce(t, "sum")) if self.state.num_processes > 1 else None)
            return dataclasses.replace(exp, non_score_reward=non_score, advantages=advantages, loss_mask=loss_mask)
        rewards, non_score = token_rewards(exp.scores, exp.kl, exp.mask, self.kl_ctl.value)
        if ppo.whiten_rewards:
            rewards = masked_whiten(rewards, exp.mask, shift_mean=False)
        advantages, returns = gae(rewards, exp.values, exp.mask, ppo.gamma, ppo.lam)
        return dataclasses.replace(exp, non_score_reward=non_score, advantages=masked_whiten(advantages, exp.mask),
                                   returns=returns, loss_mask=loss_mask)

    def minibatches(self, batch: int, epoch: int) -> list[torch.Tensor]:
        """A seeded shuffle per (step, epoch), cut into num_mini_batches equal parts."""
        generator = torch.Generator().manual_seed(self.cfg.seed * 100_003 + self.step * 1_009 + epoch)
        perm = torch.randperm(batch, generator=generator).to(self.model.device)
        return list(perm.chunk(self.ppo.num_mini_batches))

    # ================================================================================== the update
    def optimizer_step(self, exp: Experience, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimizer step on `rows`: each micro-batch adds its share of the minibatch loss (a sum divided by
        counts of the whole minibatch), so micro-batching never changes the gradient; a non-finite loss or gradient
        skips the step (counted, not averaged)."""
        self.optimizer.zero_grad(set_to_none=True)
        rows = rows[torch.argsort(exp.rollout.attention_mask[rows].sum(1), stable=True)]  # similar lengths together
        n_tokens = exp.train_mask[rows].sum().clamp(min=1)
        # dapo divides by the tokens of all ranks: the rank mean of the count, since the gradients are rank-averaged
        global_count = not self.critic and self.ppo.loss_type == "dapo" and self.state.num_processes > 1
        loss_tokens = reduce(n_tokens.float(), "mean") if global_count else n_tokens
        def record(micro: torch.Tensor) -> Callable[[torch.Tensor], None]:
            def write(logprobs: torch.Tensor) -> None:  # the update's logprobs of these rows (one update per rollout)
                width = logprobs.shape[1]
                exp.logprobs[micro, :width] = logprobs.to(exp.logprobs.dtype) * exp.mask[micro, :width]
            return write

        parts = self.runners["train"].run(len(rows), lambda a, b: update.accumulate(
            self.model, self.ppo, TrainBatch.take(exp, rows[a:b]), self.policy_params, self.value_params,
            self.kl_ctl.value, n_tokens, len(rows), loss_tokens,
            record(rows[a:b]) if exp.logprobs_from_update else None))
        stats = {k: torch.stack([p[k] for p in parts]).sum() for k in parts[0]}
        update.average_grads_across_ranks(self.policy_params + self.value_params, self.state.num_processes)
        # One gradient norm per role serves the finiteness check and the clipping; one host sync decides.
        roles = [(params, torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
                 for params in (self.policy_params, self.value_params) if params]
        checked = torch.stack([*stats.values(), *(norm.to(self.model.device) for _, norm in roles)]).float()
        has_loss = exp.train_mask[rows].sum()  # every rank must decide alike: its gradients are averaged
        has_loss = (reduce(has_loss.float(), "sum") if self.state.num_processes > 1 else has_loss) > 0
        finite = torch.isfinite(checked).all()
        if bool(finite & has_loss):
            self.nan_skips = 0
            for params, norm in roles:
                torch.nn.utils.clip_grads_with_norm_(params, self.ppo.max_grad_norm, norm)
            self.optimizer.step()
            self.scheduler.step()
            return stats
        if bool(finite):  # no response token carries loss: AdamW's moments would still move the weights
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self._skip_update()
        # The schedule follows update slots, skipped or not: the learning rate of an update does not depend on how
        # many earlier ones were skipped. (torch warns when the very first slot is skipped; nothing is wrong then.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        return {}

    def _skip_update(self) -> None:
        self.nan_skips += 1
        log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", self.step, self.nan_skips)
        self.optimizer.zero_grad(set_to_none=True)
        if self.nan_skips >= self.ppo.max_nan_skips:
            raise NonFiniteError(f"{self.nan_skips} PPO updates in a row had NaN/inf losses or gradients; lower "
                                 f"ppo.learning_rate or check the reward (max_nan_skips={self.ppo.max_nan_skips})")

    # ================================================================================== health
    def _evaluation_due(self) -> bool:
        return self.evaluation is not None and self.ppo.eval_steps > 0 and self.step % self.ppo.eval_steps == 0

    def evaluate(self) -> dict:
        """eval/* metrics of the current policy; keeps RUN/best when the best metric improved."""
        with self.clock.phase("eval"):
            metrics = self.evaluation.run(self.model, self.runners["generate"])
        metrics["time/eval_s"] = self.clock.last["eval"].time_s
        value = metrics.get(self.best_metric)
        if value is not None and (self.best is None or value > self.best["value"]):
            self.best = {"step": self.step, "metric": self.best_metric, "value": value}
            if self.state.is_main_process:
                run_state.save_best(self.run_dir / "best", self.model, self.best)
        return {"step": self.step, **metrics}

    def _stop_for_overoptimization(self, metrics: dict) -> bool:
        """The alarm: one warning line; a stop when ppo.stop_on_overoptimization is on (RUN/best stays)."""
        if self.evaluation is None or "eval/top_answer_share" not in metrics or not self.alarm.update(metrics):
            return False
        log.warning("over-optimisation: eval/score is above and %s below their values at its best (step %d) for %d "
                    "evaluations in a row (step %d)%s", self.best_metric, self.best["step"], self.alarm.patience,
                    self.step,
                    "; stopping, the best policy is in RUN/best" if self.ppo.stop_on_overoptimization else "")
        return self.ppo.stop_on_overoptimization

    # ================================================================================== metrics
    def metrics(self, exp: Experience, updates: list[dict[str, torch.Tensor]]) -> dict:
        """TRL's metric names. Update statistics average the updates that were applied; `skipped` counts the
        others. Every tensor is averaged across ranks and read in one host sync."""
        mask, applied = exp.mask, [u for u in updates if u]
        non_score = exp.non_score_reward.sum(1).mean()
        values = {
            "objective/kl": exp.kl.sum(1).mean(), "objective/entropy": (-exp.logprobs * mask).sum(1).mean(),
            "objective/non_score_reward": non_score, "objective/rlhf_reward": exp.scores.mean() + non_score,
            "objective/scores": exp.scores.mean(), "objective/raw_scores": exp.raw_scores.mean(),
            **{f"rewards/{name}/mean": part.mean() for name, part in exp.score_parts.items()},
            **({"frac_reward_zero_std": algorithms.zero_std_share(exp.raw_scores, self.ppo.num_generations)}
               if self.ppo.num_generations > 1 else {}),
            "val/num_eos_tokens": exp.rollout.has_stop.float().sum(), "val/response_length": mask.float().sum(1).mean(),
            # the share of response tokens the update learns from (< 1 with mask_truncated_completions)
            "policy/loss_token_share": exp.train_mask.sum() / mask.sum().clamp(min=1),
            **{k: torch.stack([u[k] for u in applied]).mean() for k in (applied[0] if applied else {})},
        }
        stacked = reduce(torch.stack([v.float().to(mask.device) for v in values.values()]), "mean")
        peaks = [m.allocated for m in self.clock.last.values() if m.allocated is not None]
        reserved = [m.reserved for m in self.clock.last.values() if m.reserved is not None]
        return {
            "step": self.step, "episode": self.step * len(exp) * self.state.num_processes,
            **dict(zip(values, stacked.tolist())),
            "skipped": len(updates) - len(applied),
            "lr": self.scheduler.get_last_lr()[0], "kl_coef": self.kl_ctl.value,
            **self.clock.metrics(),
            "memory/peak_bytes": max(peaks) if peaks else None,
            "memory/peak_reserved_bytes": max(reserved) if reserved else None,
            **{f"micro_batch/{p}": r.micro_batch for p, r in self.runners.items()},
            "oom/events": sum(len(r.oom_events) for r in self.runners.values()),
        }

    def log_metrics(self, metrics: dict, step: bool = True) -> None:
        if self.on_step and step:  # on_step gets the metrics of PPO steps only
            self.on_step(metrics)
        if self.state.is_main_process:
            self.metrics_log.write(metrics)

    def _progress(self):
        from tqdm.auto import tqdm

        return tqdm(total=self.ppo.total_steps, initial=self.step, desc="PPO", unit="step",
                    disable=not (self.show_progress and self.state.is_main_process))

    # ================================================================================== run state
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoint"

    def save_adapters(self) -> None:
        """The trained roles in plain PEFT format: RUN/policy and RUN/value (heads beside them). Called after the
        last checkpoint, so with ppo.load_best_at_end the best policy replaces the last one only in RUN/policy."""
        if self.ppo.load_best_at_end and self.best and self.best["step"] != self.step:
            self.model.load_adapter_weights("policy", self.run_dir / "best" / "policy")
            log.info("RUN/policy is RUN/best, step %d (%s %.4g)", self.best["step"], self.best["metric"],
                     self.best["value"])
        if self.state.is_main_process:
            self.model.save(self.run_dir, roles=run_state.trained_roles(self.model))

    def save_checkpoint(self) -> None:
        if self.state.is_main_process:
            run_state.save_checkpoint(self.checkpoint_dir, self.model, self.optimizer, self.scheduler, {
                "step": self.step, "nan_skips": self.nan_skips, "kl_ctl": self.kl_ctl.state_dict(),
                "score_moments": self.score_moments.state_dict(), "best": self.best,
                "alarm": self.alarm.state_dict() if self.evaluation is not None else None,
                "micro_batches": {p: r.micro_batch for p, r in self.runners.items()},
                "experiment": resume_guard.experiment(self.cfg)})  # what a resume may not change

    def resume(self) -> bool:
        """Load the latest checkpoint if there is one; refuse a damaged one."""
        loaded = run_state.load_checkpoint(self.checkpoint_dir, self.model, self.optimizer, self.scheduler)
        if loaded is None:
            log.info("resume: no checkpoint in %s, starting fresh", self.run_dir)
            return False
        source, counters = loaded
        self.step, self.nan_skips = counters["step"], counters["nan_skips"]
        self.kl_ctl.load_state_dict(counters["kl_ctl"])
        self.score_moments.load_state_dict(counters["score_moments"])
        self.best = counters.get("best")
        if self.evaluation is not None and counters.get("alarm"):
            self.alarm.load_state_dict(counters["alarm"])
        if self.state.is_main_process:
            run_state.truncate_metrics(self.metrics_log.path, self.step)
        for phase, size in counters["micro_batches"].items():
            self.runners[phase].micro_batch = min(self.runners[phase].micro_batch, size)
        log.info("resumed from %s at step %d", source, self.step)
        return True

    def _on_signal(self, signum, frame) -> None:
        """The step finishes (an abandoned one would leave the optimizer half-updated), then a checkpoint."""
        name = STOP_SIGNALS[signum]
        if self._interrupted:  # a second signal stops at once; the last checkpoint stays as it was
            raise Interrupted(signum)
        self._interrupted = signum
        log.warning("%s: finishing this step, writing a checkpoint, then stopping (%s again to abort)", name, name)


RLTrainer = PPOTrainer  # the online RL loop by its own name: it runs ppo, grpo, rloo and reinforce_pp
