"""The PPO loop, read top to bottom: rollout -> score -> advantages -> update.

One quantized base plays every role through its adapters (roles.py). Every phase runs in micro-batches chosen by
the memory planner; an out-of-memory error halves that phase's micro-batch and redoes the same rows, and because
sampling is keyed per row (sampling.py) and losses are token-weighted sums, the result never depends on the
micro-batch size. Config and metric names follow TRL's PPOTrainer so its users feel at home.
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from transformers import GenerationConfig

from .. import checkpoint as ckpt
from ..config import ConfigError, RecipeConfig, to_dict
from ..data import left_pad
from .decoding import StaticDecoder
from ..memory.runner import MicroBatchRunner
from .ppo import (AdaptiveKLController, FixedKLController, RunningMoments, entropy_from_logits, gae,
                  kl_penalty, masked_mean, masked_whiten, normalize_and_clip_scores, policy_loss, token_rewards,
                  value_loss)
from ..models.roles import REFERENCE, RoleModel
from .sampling import KeyedGumbelSampler, row_keys

log = logging.getLogger(__name__)
PHASES = ("generate", "score", "train")


class NonFiniteError(RuntimeError):
    """Too many PPO updates in a row had NaN/inf losses or gradients."""


@dataclass
class Rollout:
    """A batch of prompts with their sampled responses. Prompts are left-padded, responses right-padded, so every
    response starts at column `response_start`."""

    input_ids: torch.Tensor        # [B, P + R]
    attention_mask: torch.Tensor   # [B, P + R]; zero on prompt padding and after the stop token
    response_start: int            # P
    response_mask: torch.Tensor    # [B, R]; one up to and including the stop token
    prompt_index: torch.Tensor     # [B] rows of the prompt list
    has_stop: torch.Tensor         # [B] whether the response ended with the stop token

    @property
    def responses(self) -> torch.Tensor:
        return self.input_ids[:, self.response_start:]

    def __len__(self) -> int:
        return len(self.input_ids)


Scorer = Callable[[Rollout, MicroBatchRunner], torch.Tensor]


def trim_columns(attention_mask: torch.Tensor, response_start: int) -> tuple[int, int]:
    """The column span holding any real token: drops prompt padding on the left and response padding on the right
    that every row of this micro-batch shares. Padding only costs compute; dropping it changes no result."""
    used = attention_mask.any(dim=0).nonzero().flatten()
    left = min(int(used[0]), response_start - 1)
    right = max(int(used[-1]) + 1, response_start + 1)
    return left, right


class PPOTrainer:
    """PPO with LoRA roles on one base. `scorer(rollout, runner)` returns one score per sequence."""

    def __init__(self, model: RoleModel, cfg: RecipeConfig, prompts: list[list[int]], scorer: Scorer,
                 run_dir: str | Path | None = None, micro_batches: dict | None = None,
                 oom_injection: dict | None = None, force_response_length: bool = False,
                 show_progress: bool = True, on_step: Callable[[dict], None] | None = None):
        from accelerate import PartialState

        if not prompts:
            raise ConfigError("data.prompts: PPO needs at least one prompt")
        self.model, self.cfg, self.ppo = model, cfg, cfg.ppo
        self.prompts, self.scorer = prompts, scorer
        self.run_dir = Path(run_dir or cfg.run_dir)
        self.force_response_length = force_response_length
        self.show_progress, self.on_step = show_progress, on_step
        self.state = PartialState()
        if self.ppo.rollout_batch_size % self.ppo.num_mini_batches:
            raise ConfigError(f"ppo.rollout_batch_size ({self.ppo.rollout_batch_size}) must be divisible by "
                             f"ppo.num_mini_batches ({self.ppo.num_mini_batches})")
        micro_batches = micro_batches or {}
        oom_injection = oom_injection or {}
        self.runners = {p: MicroBatchRunner(p, micro_batches.get(p, self.ppo.rollout_batch_size),
                                            inject_oom_above=oom_injection.get(p)) for p in PHASES}
        self.policy_params = model.role_parameters("policy")
        self.value_params = [] if model.critic == "shared" else model.role_parameters("value")
        groups = [{"params": self.policy_params, "lr": self.ppo.learning_rate}]
        if self.value_params:
            groups.append({"params": self.value_params, "lr": self.ppo.value_learning_rate})
        self.optimizer = torch.optim.AdamW(groups, eps=1e-5)
        updates = self.ppo.total_steps * self.ppo.num_ppo_epochs * self.ppo.num_mini_batches
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda i: 1.0 if self.ppo.lr_scheduler_type == "constant" else max(0.0, 1 - i / updates))
        self.kl_ctl = (AdaptiveKLController(self.ppo.kl_coef, self.ppo.kl_target, self.ppo.kl_horizon)
                       if self.ppo.adaptive_kl else FixedKLController(self.ppo.kl_coef))
        self.score_moments = RunningMoments()
        self.decoder = (StaticDecoder(model.causal_lm, compiled=self.ppo.decode == "static-compiled")
                        if self.ppo.decode != "generate" else None)
        self.step = 0
        self.nan_skips = 0
        self.order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(cfg.seed))
        self._interrupted = False

    # ================================================================================== the story
    def train(self) -> list[dict]:
        """Run PPO to `total_steps`, checkpointing every `save_steps`, at the end and on Ctrl-C."""
        if self.ppo.resume:
            self.resume()
        history = []
        progress = self._progress()
        previous = signal.signal(signal.SIGINT, self._on_sigint) if self._is_main_thread() else None
        try:
            while self.step < self.ppo.total_steps:
                metrics = self.train_step()
                history.append(metrics)
                progress.update(1)
                progress.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
                if self._interrupted:
                    self.save_checkpoint()
                    raise KeyboardInterrupt
                if self.ppo.save_steps and self.step % self.ppo.save_steps == 0:
                    self.save_checkpoint()
            self.save_checkpoint()
            self.save_adapters()
        finally:
            progress.close()
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        return history

    def train_step(self) -> dict:
        """One PPO step: rollout -> score -> advantages -> update, then metrics."""
        timer = {}
        t0 = time.perf_counter()
        rollout = self.rollout()
        timer["time/generate_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        scored = self.score(rollout)
        timer["time/score_s"] = time.perf_counter() - t0

        advantages, returns = self.advantages(scored, rollout.response_mask)

        t0 = time.perf_counter()
        update_stats = self.update(rollout, scored, advantages, returns)
        timer["time/train_s"] = time.perf_counter() - t0

        mean_kl = (scored["kl"] * rollout.response_mask).sum(1).mean()
        self.kl_ctl.update(self._mean_across_ranks(mean_kl).item(), len(rollout) * self.state.num_processes)
        self.step += 1
        metrics = self.metrics(rollout, scored, update_stats, timer)
        self.log_metrics(metrics)
        return metrics

    # ================================================================================== rollout
    def prompt_indices(self, step: int) -> torch.Tensor:
        """This rank's prompt rows for `step`: a fixed shuffle, walked in order, disjoint across ranks."""
        b, n = self.ppo.rollout_batch_size, len(self.prompts)
        first = (step * self.state.num_processes + self.state.process_index) * b
        return self.order[torch.arange(first, first + b) % n]

    @torch.no_grad()
    def rollout(self) -> Rollout:
        """Sample responses with the policy adapter: KV cache on, checkpointing off, no top-k/top-p, and no
        vocabulary-wide scores kept (logprobs of the chosen tokens come from a forward pass afterwards)."""
        index = self.prompt_indices(self.step)
        tok = self.model.tokenizer
        query, query_mask = left_pad([self.prompts[i] for i in index.tolist()], tok.pad_token_id)
        device = self.model.device
        query, query_mask = query.to(device), query_mask.to(device)
        keys = row_keys(self.cfg.seed, self.step, index)
        length = self.ppo.response_length
        stop_id = tok.eos_token_id if self.ppo.stop_token == "eos" else None
        gen_cfg = GenerationConfig(max_new_tokens=length, do_sample=False, num_beams=1, use_cache=True,
                                   # [] and not None: None would be filled in from the model's own eos
                                   eos_token_id=stop_id if stop_id is not None else [], pad_token_id=tok.pad_token_id,
                                   min_new_tokens=length if self.force_response_length else None)

        def generate(a: int, b: int) -> torch.Tensor:
            sampler = KeyedGumbelSampler(keys[a:b], self.ppo.temperature)
            if self.decoder is not None:
                with self.model.generation_mode():
                    self.model.activate("policy")
                    return self.decoder.sample(query[a:b], query_mask[a:b], sampler, length, stop_id,
                                               tok.pad_token_id, self.force_response_length)
            out = self.model.generate("policy", query[a:b], query_mask[a:b], generation_config=gen_cfg,
                                      logits_processor=[sampler])
            response = out[:, query.shape[1]:]
            pad = torch.full((b - a, length - response.shape[1]), tok.pad_token_id, device=device,
                             dtype=response.dtype)
            return torch.cat([response, pad], dim=1)

        responses = torch.cat(self.runners["generate"].run(len(index), generate), dim=0)
        response_mask, has_stop = self._response_mask(responses, stop_id)
        responses = torch.where(response_mask.bool(), responses, torch.full_like(responses, tok.pad_token_id))
        return Rollout(input_ids=torch.cat([query, responses], dim=1),
                       attention_mask=torch.cat([query_mask, response_mask], dim=1),
                       response_start=query.shape[1], response_mask=response_mask, prompt_index=index,
                       has_stop=has_stop)

    @staticmethod
    def _response_mask(responses: torch.Tensor, stop_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Ones up to and including the first stop token (TRL's truncate_response), everything if none."""
        length = responses.shape[1]
        if stop_id is None:
            return torch.ones_like(responses), torch.zeros(len(responses), dtype=torch.bool, device=responses.device)
        is_stop = responses == stop_id
        has_stop = is_stop.any(dim=1)
        first = torch.where(has_stop, is_stop.float().argmax(dim=1), torch.full_like(has_stop, length - 1,
                                                                                        dtype=torch.long))
        positions = torch.arange(length, device=responses.device)
        return (positions[None, :] <= first[:, None]).long(), has_stop

    # ================================================================================== scoring
    def map_rows(self, rollout: Rollout, runner: MicroBatchRunner, fn) -> torch.Tensor:
        """Apply fn(ids, mask, response_start) -> [n, r] (or [n]) over micro-batches of rows grouped by length,
        with shared padding columns trimmed; scatter results back to the original row order, full width."""
        lengths = rollout.attention_mask.sum(1)
        order = torch.argsort(lengths, stable=True)
        width = rollout.response_mask.shape[1]

        def run(a: int, b: int) -> torch.Tensor:
            rows = order[a:b]
            mask = rollout.attention_mask[rows]
            left, right = trim_columns(mask, rollout.response_start)
            out = fn(rollout.input_ids[rows, left:right], mask[:, left:right], rollout.response_start - left)
            if out.dim() >= 2 and out.shape[1] < width:  # per-token outputs [n, r, ...] back to full width
                full = out.new_zeros((out.shape[0], width, *out.shape[2:]))
                full[:, :out.shape[1]] = out
                out = full
            return out

        parts = torch.cat(runner.run(len(order), run), dim=0)
        result = torch.empty_like(parts)
        result[order] = parts
        return result

    @torch.no_grad()
    def score(self, rollout: Rollout) -> dict:
        """Policy and reference logprobs, values and scores for the rollout, all without gradients."""
        model, temp, runner = self.model, self.ppo.temperature, self.runners["score"]
        shared = model.critic == "shared"

        def policy(ids, mask, start):
            out = model.response_logprobs("policy", ids, mask, start, temp, with_values=shared)
            return torch.stack([out["logprobs"], out["values"]], dim=-1) if shared else out["logprobs"]

        policy_out = self.map_rows(rollout, runner, policy)
        logprobs = policy_out[..., 0] if shared else policy_out
        # the reference goes through exactly the same code path and temperature: KL is 0 while policy == sft
        ref_logprobs = self.map_rows(rollout, runner, lambda ids, mask, start: model.response_logprobs(
            REFERENCE, ids, mask, start, temp)["logprobs"])
        values = policy_out[..., 1] if shared else self.map_rows(
            rollout, runner, lambda ids, mask, start: model.token_values(ids, mask, start))
        scores = self.scorer(rollout, runner).float().to(logprobs.device)
        raw_scores = scores.clone()
        if self.ppo.missing_eos_penalty is not None:
            scores = scores - self.ppo.missing_eos_penalty * (~rollout.has_stop).float()
        if self.ppo.normalize_scores or self.ppo.score_clip is not None:
            scores = normalize_and_clip_scores(scores, self.score_moments if self.ppo.normalize_scores else None,
                                               self.ppo.score_clip)
        mask = rollout.response_mask
        kl = kl_penalty(logprobs, ref_logprobs, self.ppo.kl_estimator) * mask
        return {"logprobs": logprobs * mask, "ref_logprobs": ref_logprobs * mask, "values": values * mask,
                "scores": scores, "raw_scores": raw_scores, "kl": kl}

    # ================================================================================== advantages
    def advantages(self, scored: dict, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token rewards (KL penalty + score at the last token), GAE, then whitened advantages."""
        rewards, non_score = token_rewards(scored["scores"], scored["kl"], mask, self.kl_ctl.value)
        scored["non_score_reward"] = non_score
        if self.ppo.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, scored["values"], mask, self.ppo.gamma, self.ppo.lam)
        return masked_whiten(advantages, mask), returns

    # ================================================================================== update
    def update(self, rollout: Rollout, scored: dict, advantages: torch.Tensor, returns: torch.Tensor) -> dict:
        """`num_ppo_epochs` passes over shuffled minibatches; each minibatch is one optimizer step whose gradient
        is accumulated over micro-batches as a token-weighted mean, so micro-batching never changes it."""
        batch = len(rollout)
        minibatch = batch // self.ppo.num_mini_batches
        totals: dict[str, float] = {}
        n_updates = 0
        for epoch in range(self.ppo.num_ppo_epochs):
            generator = torch.Generator().manual_seed(self.cfg.seed * 100_003 + self.step * 1_009 + epoch)
            perm = torch.randperm(batch, generator=generator).to(rollout.input_ids.device)
            for first in range(0, batch, minibatch):
                rows = perm[first:first + minibatch]
                stats = self.minibatch_step(rollout, scored, advantages, returns, rows)
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0.0) + value
                n_updates += 1
        return {k: v / n_updates for k, v in totals.items()}

    def minibatch_step(self, rollout, scored, advantages, returns, rows) -> dict:
        self.optimizer.zero_grad(set_to_none=True)
        # rows of similar length share micro-batches, so trimming shared padding saves the most
        rows = rows[torch.argsort(rollout.attention_mask[rows].sum(1), stable=True)]
        n_tokens = rollout.response_mask[rows].sum().clamp(min=1)
        results = self.runners["train"].run(len(rows), lambda a, b: self.micro_batch_grads(
            rollout, scored, advantages, returns, rows[a:b], n_tokens))
        stats = {k: sum(r[k] for r in results) for k in results[0]}
        self._all_reduce_grads()
        # One gradient norm per role serves both the finiteness check (one host sync, not one per parameter) and
        # the clipping below.
        roles = [(params, torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
                 for params in (self.policy_params, self.value_params) if params]
        finite = all(math.isfinite(v) for v in stats.values()) and bool(
            torch.isfinite(torch.stack([norm.to(roles[0][1].device) for _, norm in roles])).all())
        if not finite:
            self.nan_skips += 1
            log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", self.step,
                        self.nan_skips)
            self.optimizer.zero_grad(set_to_none=True)
            if self.nan_skips >= self.ppo.max_nan_skips:
                raise NonFiniteError(f"{self.nan_skips} PPO updates in a row had NaN/inf losses or gradients; "
                                     f"lower ppo.learning_rate or check the reward (max_nan_skips="
                                     f"{self.ppo.max_nan_skips})")
            return {**{k: 0.0 for k in stats}, "skipped": 1.0}
        self.nan_skips = 0
        for params, norm in roles:
            torch.nn.utils.clip_grads_with_norm_(params, self.ppo.max_grad_norm, norm)
        self.optimizer.step()
        self.scheduler.step()
        return {**stats, "skipped": 0.0}

    def micro_batch_grads(self, rollout, scored, advantages, returns, rows, n_tokens) -> dict:
        """Losses of one micro-batch, scaled by its share of the minibatch's tokens; gradients are computed with
        autograd.grad and added to .grad only at the end, so an OOM halfway leaves nothing half-accumulated."""
        model, ppo = self.model, self.ppo
        mask = rollout.attention_mask[rows]
        left, right = trim_columns(mask, rollout.response_start)
        ids, mask, start = rollout.input_ids[rows, left:right], mask[:, left:right], rollout.response_start - left
        width = right - rollout.response_start
        resp_mask = rollout.response_mask[rows, :width].float()
        weight = resp_mask.sum() / n_tokens
        pick = {k: v[rows, :width] for k, v in (("old_lp", scored["logprobs"]), ("old_v", scored["values"]),
                                                 ("adv", advantages), ("ret", returns))}
        shared = model.critic == "shared"

        out = model.response_logprobs("policy", ids, mask, start, ppo.temperature, with_values=shared,
                                      with_logits=True)
        pg_loss, pg_stats = policy_loss(out["logprobs"], pick["old_lp"], pick["adv"], resp_mask, ppo.cliprange)
        if shared:
            values = out["values"]
        else:
            policy_grads = torch.autograd.grad(pg_loss * weight, self.policy_params)
            # A separate backward per role: with gradient checkpointing, a backward that spans two roles would
            # recompute the first role's layers under the adapter that is active by then.
            values = model.token_values(ids, mask, start)
        vf_loss, vf_stats = value_loss(values, pick["old_v"], pick["ret"], resp_mask, ppo.cliprange_value)
        if shared:
            grads = torch.autograd.grad((pg_loss + ppo.vf_coef * vf_loss) * weight, self.policy_params)
        else:
            grads = policy_grads + torch.autograd.grad(ppo.vf_coef * vf_loss * weight, self.value_params)
        with torch.no_grad():
            entropy = masked_mean(entropy_from_logits(out["logits"]), resp_mask)
        for param, grad in zip(self.policy_params + self.value_params, grads):
            param.grad = grad if param.grad is None else param.grad + grad
        stats = {"loss/policy_avg": pg_loss, "loss/value_avg": vf_loss, "policy/approxkl_avg": pg_stats["approxkl"],
                 "policy/clipfrac_avg": pg_stats["clipfrac"], "val/clipfrac_avg": vf_stats["clipfrac"],
                 "policy/entropy_avg": entropy, "val/ratio": pg_stats["ratio"]}
        values = (torch.stack([v.detach().float() for v in stats.values()]) * weight).tolist()  # one host sync
        return dict(zip(stats, values))

    def _all_reduce_grads(self) -> None:
        """Data parallel without wrapping the quantized model in DDP: average the adapters' gradients across
        ranks, so identical initial adapters + identical updates keep every rank's adapters identical."""
        if self.state.num_processes == 1:
            return
        import torch.distributed as dist

        for param in self.policy_params + self.value_params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad /= self.state.num_processes

    def _mean_across_ranks(self, value: torch.Tensor) -> torch.Tensor:
        if self.state.num_processes == 1:
            return value
        import torch.distributed as dist

        value = value.detach().clone().float()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.state.num_processes

    # ================================================================================== metrics
    def metrics(self, rollout: Rollout, scored: dict, update_stats: dict, timer: dict) -> dict:
        mask = rollout.response_mask
        mean = lambda t: self._mean_across_ranks(t).item()  # noqa: E731
        non_score = scored["non_score_reward"].sum(1).mean()
        metrics = {
            "step": self.step, "episode": self.step * len(rollout) * self.state.num_processes,
            "objective/kl": mean((scored["kl"] * mask).sum(1).mean()),
            "objective/entropy": mean((-scored["logprobs"] * mask).sum(1).mean()),
            "objective/non_score_reward": mean(non_score),
            "objective/rlhf_reward": mean(scored["scores"].mean() + non_score),
            "objective/scores": mean(scored["scores"].mean()),
            "objective/raw_scores": mean(scored["raw_scores"].mean()),
            "val/num_eos_tokens": mean(rollout.has_stop.float().sum()),
            "val/response_length": mean(mask.float().sum(1).mean()),
            **update_stats,
            "lr": self.scheduler.get_last_lr()[0], "kl_coef": self.kl_ctl.value,
            **timer,
            "memory/peak_bytes": int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None,
            "memory/peak_reserved_bytes": int(torch.cuda.max_memory_reserved()) if torch.cuda.is_available()
            else None,
            **{f"micro_batch/{p}": r.micro_batch for p, r in self.runners.items()},
            "oom/events": sum(len(r.oom_events) for r in self.runners.values()),
        }
        return metrics

    def log_metrics(self, metrics: dict) -> None:
        if self.on_step:
            self.on_step(metrics)
        if not self.state.is_main_process:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        self._report(metrics)

    def _report(self, metrics: dict) -> None:
        if self.ppo.report_to == "none":
            return
        if not hasattr(self, "_writer"):
            self._writer = make_reporter(self.ppo.report_to, self.run_dir, to_dict(self.cfg))
        self._writer(metrics)

    def _progress(self):
        from tqdm.auto import tqdm

        return tqdm(total=self.ppo.total_steps, initial=self.step, desc="PPO", unit="step",
                    disable=not (self.show_progress and self.state.is_main_process))

    # ================================================================================== checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoint"

    def save_adapters(self) -> None:
        """The trained roles in plain PEFT format: RUN/policy and RUN/value (heads beside them)."""
        if self.state.is_main_process:
            self.model.save(self.run_dir, roles=[r for r in ("policy", "value") if r in self.model.roles])

    def save_checkpoint(self) -> None:
        """Adapters, heads, optimizer, scheduler, KL controller, score statistics, RNG states and step, atomically."""
        if not self.state.is_main_process:
            return

        def write(tmp: Path) -> None:
            self.model.save(tmp, roles=[r for r in ("policy", "value") if r in self.model.roles])
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "rng": get_rng_state()}, tmp / "trainer_state.pt")
            state = {"step": self.step, "nan_skips": self.nan_skips, "kl_ctl": self.kl_ctl.state_dict(),
                     "score_moments": self.score_moments.state_dict(),
                     "micro_batches": {p: r.micro_batch for p, r in self.runners.items()}}
            (tmp / "trainer_state.json").write_text(json.dumps(state, default=float))

        ckpt.write_atomically(self.checkpoint_dir, write)

    def resume(self) -> bool:
        """Load the latest checkpoint if there is one; refuse a damaged one."""
        source = ckpt.latest(self.checkpoint_dir)
        if source is None:
            log.info("resume: no checkpoint in %s, starting fresh", self.run_dir)
            return False
        ckpt.verify(source)
        load_adapter_weights(self.model, source)
        blob = torch.load(source / "trainer_state.pt", weights_only=True)
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        set_rng_state(blob["rng"])
        state = json.loads((source / "trainer_state.json").read_text())
        self.step, self.nan_skips = state["step"], state["nan_skips"]
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.score_moments.load_state_dict(state["score_moments"])
        self._truncate_metrics(self.step)
        for phase, size in state["micro_batches"].items():
            self.runners[phase].micro_batch = min(self.runners[phase].micro_batch, size)
        log.info("resumed from %s at step %d", source, self.step)
        return True

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines of steps after the checkpoint: a kill between a step's log line and its checkpoint
        would otherwise leave that step twice in metrics.jsonl after the resume."""
        path = self.run_dir / "metrics.jsonl"
        if not self.state.is_main_process or not path.is_file():
            return
        lines = path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        if len(kept) != len(lines):
            path.write_text("".join(line + "\n" for line in kept))

    def _on_sigint(self, signum, frame) -> None:
        if self._interrupted:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self._interrupted = True
        log.warning("Ctrl-C: finishing this step, writing a checkpoint, then stopping (Ctrl-C again to abort)")

    @staticmethod
    def _is_main_thread() -> bool:
        import threading

        return threading.current_thread() is threading.main_thread()


def get_rng_state() -> dict:
    """Every RNG a user's reward function or a library might draw from (the loop itself uses keyed sampling)."""
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available()
            else [], "python": [version, torch.tensor(state, dtype=torch.int64), gauss],
            "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}


def set_rng_state(blob: dict) -> None:
    torch.set_rng_state(blob["torch"])
    if blob["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["cuda"])
    version, state, gauss = blob["python"]
    random.setstate((version, tuple(state.tolist()), gauss))
    keys, pos, has_gauss, cached = blob["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def load_adapter_weights(model: RoleModel, source: Path) -> None:
    """Copy saved policy/value adapter and head weights into the live model in place: requires_grad and the
    optimizer's parameter identities stay as they are."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from ..models.roles import HEAD_FILES

    for role in ("policy", "value"):
        path = source / role / "adapter_model.safetensors"
        if role in model.roles and path.is_file():
            result = set_peft_model_state_dict(model.peft, load_file(str(path), device=str(model.device)),
                                               adapter_name=role)
            bad = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
            if bad:
                raise ckpt.CheckpointError(f"{path}: keys that fit no adapter, e.g. {bad[0]}")
    for head, module in model.heads.items():
        path = source / model.adapter_for(head) / HEAD_FILES[head]
        if path.is_file():
            with torch.no_grad():
                for name, tensor in load_file(str(path), device=str(model.device)).items():
                    getattr(module, name).copy_(tensor)


def make_reporter(kind: str, run_dir: Path, config: dict):
    """tensorboard or wandb, when that package is installed; a clear error otherwise."""
    if kind == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RuntimeError("ppo.report_to: tensorboard needs `pip install tensorboard`; allowed: none, "
                               "tensorboard, wandb") from None
        writer = SummaryWriter(str(run_dir / "tensorboard"))
        return lambda m: [writer.add_scalar(k, v, m["step"]) for k, v in m.items()
                          if isinstance(v, (int, float)) and k != "step"] and writer.flush()
    try:
        import wandb
    except ImportError:
        raise RuntimeError("ppo.report_to: wandb needs `pip install wandb`; allowed: none, tensorboard, "
                           "wandb") from None
    wandb.init(config=config, dir=str(run_dir))
    return lambda m: wandb.log({k: v for k, v in m.items() if v is not None}, step=m["step"])
