"""The recipe, end to end: SFT -> reward model -> online RL (PPO, GRPO, RLOO, REINFORCE++), or SFT -> DPO with
dpo.enabled; each stage writes its part of one run directory.

    RUN/recipe.yaml          the resolved recipe
    RUN/sft/                 SFT adapter (TRL SFTTrainer)         -> the reference; policy starts as a copy
    RUN/reward/              reward adapter + reward_head (TRL RewardTrainer)
    RUN/policy/, RUN/value/  PPO's trained roles (+ value_head); or DPO's policy (+ dpo_metrics.json), same format
    RUN/checkpoint/          the latest PPO checkpoint (atomic, with a manifest)
    RUN/metrics.jsonl        one line per PPO step
    RUN/.lowrank_rlhf-files.json, RUN/.lowrank_rlhf.lock   what the run wrote (run_dir.py), its one writer (run_lock.py)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import torch
import yaml

from . import data, rewards
from .config import ConfigError, RecipeConfig, to_dict
from .memory.plan import enforce_budget, gradient_checkpointing, micro_batches, plan_recipe
from .models.loading import check_llama_family, load_base, load_tokenizer, resolve_model_path
from .models.roles import RoleModel
from .models.shapes import ModelShape
from .rewards import Scorer
from .rl.algorithms import check_algorithm, has_critic
from .rl.health import HeldOutEval
from .rl.rollout import stop_token_ids
from .rl.trainer import PPOTrainer
from .run import checkpoint as ckpt
from .run import lock as run_lock
from .run import resume_guard
from .run.directory import RUN_FILES, RunDirError, check_writable, claim
from .run.metadata import META_FILE, check_base, read_run_metadata
from .stages.checkpoints import SECTIONS as STAGE_SECTIONS
from .stages.checkpoints import has_checkpoints

log = logging.getLogger(__name__)
STAGES = ("sft", "reward", "ppo", "dpo")
POLICY_OUTPUTS = ["policy", "value", "best", "checkpoint", "metrics.jsonl"]
DPO_SKIPS = "reward model and online RL skipped: dpo.enabled=true trains sft -> dpo"


def stages_for(cfg: RecipeConfig, stage: str = "all") -> list[str]:
    """`--stage all`: sft -> reward -> ppo (online RL), or sft -> dpo when dpo.enabled; else the one stage named."""
    if stage == "all":
        return ["sft", "dpo"] if cfg.dpo.enabled else ["sft", "reward", "ppo"]
    if stage == "rl":  # online RL by its own name; "ppo" names the same stage whatever ppo.algorithm is
        return ["ppo"]
    if stage not in STAGES:
        raise ConfigError(f"--stage: unknown stage {stage!r}; allowed values: {', '.join(STAGES)}, rl, all")
    return [stage]


def stage_outputs(run_dir: Path, stage: str) -> list[Path]:
    # DPO writes the policy online RL writes: a DPO run replaces PPO's results and the other way round
    names = {"sft": ["sft"], "reward": ["reward"], "ppo": POLICY_OUTPUTS, "dpo": POLICY_OUTPUTS}[stage]
    return [run_dir / n for n in names if (run_dir / n).exists()]


def check_run_dir(cfg: RecipeConfig, run_dir: Path, stages: list[str], overwrite: bool) -> None:
    """Refuse to overwrite a stage's results unless --overwrite, or ppo.resume for the PPO stage."""
    if overwrite:
        return
    for stage in stages:
        if stage == "ppo" and cfg.ppo.resume:
            continue
        if stage in STAGE_SECTIONS:
            key = f"{STAGE_SECTIONS[stage]}.resume"
            if getattr(cfg, STAGE_SECTIONS[stage]).resume:
                continue
            if has_checkpoints(run_dir, stage):
                raise RunDirError(f"{run_dir} holds an unfinished {stage} stage (checkpoint-{stage}); rerun with "
                                  f"{key}=true to continue it, or pass --overwrite to start it over")
        found = stage_outputs(run_dir, stage)
        if found:
            if stage == "dpo":  # RUN/policy may be online RL's: --overwrite replaces it and PPO's checkpoint
                raise RunDirError(f"{run_dir} already holds a trained policy ({found[0].name}); pass --overwrite to "
                                  f"replace it with DPO's, or choose another --output-dir")
            resume = "set ppo.resume=true" if stage == "ppo" else "continue PPO with --stage ppo ppo.resume=true"
            raise RunDirError(f"{run_dir} already holds {stage} results ({found[0].name}); pass --overwrite, "
                              f"{resume}, or choose another --output-dir")


def check_context(cfg: RecipeConfig, model_config) -> None:
    """A rollout (prompt + response) must fit the context: model.max_length, and the positions the model knows."""
    positions = getattr(model_config, "max_position_embeddings", None) or cfg.model.max_length
    context = min(cfg.model.max_length, positions)
    need = cfg.data.max_prompt_length + cfg.ppo.response_length
    if need > context:
        raise ConfigError(f"data.max_prompt_length + ppo.response_length = {need} tokens, past the model's context of "
                          f"{context} (model.max_length {cfg.model.max_length}, the model's {positions} positions); "
                          f"lower one of them" + (" or raise model.max_length" if context < positions else ""))


def preflight(cfg: RecipeConfig, stages: list[str], run_dir: Path) -> None:
    """Every check of the user's input that needs no model weights, before the run directory is touched: a bad
    input must leave an existing run as it was (its recipe.yaml, and with --overwrite its PPO results)."""
    if "sft" in stages and cfg.sft.enabled:
        sft_data(cfg)
    if "reward" in stages and cfg.reward_model.enabled and cfg.rewards.learned_weight:
        preference_data(cfg)
    if "dpo" in stages:
        preference_data(cfg, "dpo")
        if not ("sft" in stages and cfg.sft.enabled):
            check_sft_adapter(run_dir)
    if "ppo" in stages:
        table = prompt_data(cfg)
        rewards.load_reward_functions(cfg.rewards.functions, cfg.rewards.function_weights)
        rewards.load_reward_functions(cfg.rewards.eval_functions)
        if cfg.ppo.eval_steps and cfg.data.eval_prompts:
            data.load_prompts(cfg.data.eval_prompts, cfg.data.max_samples, name="data.eval_prompts")
        elif cfg.ppo.load_best_at_end:
            raise ConfigError("ppo.load_best_at_end: there is no RUN/best to load without evaluations; set "
                              "ppo.eval_steps (> 0) and data.eval_prompts (a validation table), or "
                              "ppo.load_best_at_end=false")
        if not ("reward" in stages and cfg.reward_model.enabled):
            check_reward_model(cfg, run_dir)
            check_reward_accuracy(cfg, run_dir)
    path = resolve_model_path(cfg.model.name)
    check_llama_family(path, cfg.model.trust_remote_code)
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    if "ppo" in stages:
        check_context(cfg, model_config)
    if (run_dir / META_FILE).is_file():
        check_base(read_run_metadata(run_dir), model_config, cfg.model.name, run_dir)
    if "ppo" in stages:
        plan_recipe(cfg)  # a budget below the static floor
        if cfg.data.long_prompts == "error":
            tokenizer = load_tokenizer(path, cfg.model.trust_remote_code)
            check_prompt_lengths(table, tokenizer, cfg, cfg.data.prompts, "data.prompts")
            if cfg.ppo.eval_steps and cfg.data.eval_prompts:
                check_prompt_lengths(data.load_prompts(cfg.data.eval_prompts, cfg.data.max_samples,
                                                       name="data.eval_prompts"),
                                     tokenizer, cfg, cfg.data.eval_prompts, "data.eval_prompts")
        source = ckpt.latest(run_dir / "checkpoint") if cfg.ppo.resume else None
        if source is not None:
            try:
                ckpt.verify(source)
            except ckpt.CheckpointError as err:
                raise ckpt.CheckpointError(f"{err}; cannot resume from it: restore it, or start PPO over with "
                                           f"--overwrite (without ppo.resume)") from None
            saved = json.loads((source / "trainer_state.json").read_text()).get("experiment")
            resume_guard.check_resume(saved, cfg, stages, source)


def check_prompt_lengths(table, tokenizer, cfg: RecipeConfig, source: str, name: str) -> None:
    """long_prompts=error: name the file and the first row that is too long (chat.py's error counts them only)."""
    limit = cfg.data.max_prompt_length
    lengths = [len(data.prompt_ids(tokenizer, p, name, i)) for i, p in enumerate(table["prompt"])]
    too_long = [i for i, n in enumerate(lengths) if n > limit]
    if too_long:
        first = too_long[0]
        raise data.DataError(f"{name}: {len(too_long)} of {len(lengths)} prompts are longer than "
                             f"data.max_prompt_length={limit} tokens, the first in {source} row {first} "
                             f"({lengths[first]} tokens; longest: {max(lengths)}); raise data.max_prompt_length or "
                             f"set data.long_prompts=truncate")


def save_recipe(cfg: RecipeConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def sft_data(cfg: RecipeConfig):
    if not cfg.data.sft:
        raise ConfigError("data.sft: no SFT data given; set data.sft or run --stage reward/ppo")
    return data.load_sft(cfg.data.sft, cfg.data.max_samples)


def preference_data(cfg: RecipeConfig, stage: str = "reward"):
    if not cfg.data.preferences:
        raise ConfigError("data.preferences: no preference data given; set data.preferences or " +
                          ("rewards.learned_weight=0" if stage == "reward" else "dpo.enabled=false"))
    return data.load_preferences(cfg.data.preferences, cfg.data.max_samples)


def prompt_data(cfg: RecipeConfig):
    if not cfg.data.prompts:
        raise ConfigError("data.prompts: no PPO prompts given; set data.prompts")
    return data.load_prompts(cfg.data.prompts, cfg.data.max_samples)


def check_reward_model(cfg: RecipeConfig, run_dir: Path) -> None:
    if cfg.rewards.learned_weight and not (run_dir / "reward" / "adapter_config.json").is_file():
        raise ConfigError(f"rewards.learned_weight: {cfg.rewards.learned_weight} needs a reward model in "
                          f"{run_dir}/reward; run --stage reward first or set rewards.learned_weight=0")


def check_sft_adapter(run_dir: Path) -> None:
    if not (run_dir / "sft" / "adapter_config.json").is_file():
        raise ConfigError(f"dpo: {run_dir}/sft holds no SFT adapter (DPO's policy starts from it, its reference is a "
                          f"frozen copy); run --stage sft first, or train all stages with dpo.enabled=true")


def run_sft(cfg: RecipeConfig, run_dir: Path) -> dict:
    from .stages import train_sft

    return train_sft(cfg, sft_data(cfg), run_dir)


def run_reward(cfg: RecipeConfig, run_dir: Path) -> dict:
    from .stages import train_reward

    pairs = preference_data(cfg)
    train, held_out = data.holdout_split(pairs, cfg.data.eval_fraction, cfg.seed)
    prompts = (data.load_prompts(cfg.data.eval_prompts, cfg.data.max_samples, name="data.eval_prompts")
               if cfg.data.eval_prompts else None)
    return train_reward(cfg, train, run_dir, eval_dataset=held_out, eval_prompts=prompts)


def run_dpo(cfg: RecipeConfig, run_dir: Path) -> dict:
    """DPO on the preference pairs (data.eval_fraction held out, as for the reward model): RUN/policy."""
    from .stages import train_dpo

    train, held_out = data.holdout_split(preference_data(cfg, "dpo"), cfg.data.eval_fraction, cfg.seed)
    return train_dpo(cfg, train, run_dir, eval_dataset=held_out)


def load_roles(cfg: RecipeConfig, run_dir: Path, base=None, tokenizer=None) -> RoleModel:
    """The PPO roles on one base: sft and reward from the run if present, policy from sft (or fresh), value fresh
    (or from the run when resuming). The critic-free algorithms get no value role and no value head."""
    check_algorithm(cfg.ppo)  # before the base loads: a wrong group size must not wait for a 7B model
    critic = has_critic(cfg.ppo.algorithm)
    # lora.critic=shared means "a value head on the policy": without a critic there is none, so no head is built
    lora = cfg.lora if critic else dataclasses.replace(cfg.lora, critic="separate")
    if base is None:
        base, tokenizer = load_base(cfg.model)
    wanted = ["policy", "value"] if critic else ["policy"]
    if (run_dir / "sft" / "adapter_config.json").is_file():
        wanted.append("sft")
    if cfg.rewards.learned_weight:
        check_reward_model(cfg, run_dir)
        wanted.append("reward")
    kwargs = dict(base_name=cfg.model.name, quantization=cfg.model.quantization, roles=tuple(wanted), seed=cfg.seed)
    if (run_dir / META_FILE).is_file():
        model = RoleModel.load(base, tokenizer, run_dir, lora, **kwargs)
    else:
        model = RoleModel(base, tokenizer, lora, **kwargs)
    fresh_critic = "value" in model.roles and not (run_dir / "value" / "adapter_config.json").is_file()
    if fresh_critic and cfg.lora.critic_init == "reward" and "reward" in model.roles:
        copy_role(model, "reward", "value")
    return model


def copy_role(model: RoleModel, source: str, target: str) -> None:
    """Start `target`'s adapter and head as a copy of `source`'s (a critic that starts from the reward model already
    tells good answers from bad ones: TRL's PPOv2 and OpenRLHF initialise it so). Copied in place, so
    requires_grad and parameter identities stay as they are."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    state = get_peft_model_state_dict(model.peft, adapter_name=source)
    set_peft_model_state_dict(model.peft, state, adapter_name=target)  # keys carry no adapter name
    with torch.no_grad():
        for mine, theirs in zip(model.heads[target].parameters(), model.heads[source].parameters()):
            mine.copy_(theirs)


def check_reward_accuracy(cfg: RecipeConfig, run_dir: Path) -> None:
    """reward_model.min_accuracy: refuse PPO on a reward model that ranks held-out pairs too poorly."""
    wanted = cfg.reward_model.min_accuracy
    if wanted is None or not cfg.rewards.learned_weight:
        return
    path = run_dir / "reward" / "eval.json"
    measured = json.loads(path.read_text()).get("accuracy") if path.is_file() else None
    if measured is None:
        raise ConfigError(f"reward_model.min_accuracy: {wanted} needs a held-out accuracy in {path}; rerun --stage "
                          f"reward with data.eval_fraction > 0, or set reward_model.min_accuracy=null")
    if measured < wanted:
        raise ConfigError(f"reward_model.min_accuracy: the reward model's held-out pairwise accuracy is "
                          f"{measured:.3f}, below {wanted}; train it longer or on better pairs, or lower the bar")


def held_out_evaluation(cfg: RecipeConfig, model: RoleModel, stop_ids: list[int]) -> HeldOutEval | None:
    """ppo.eval_steps on data.eval_prompts: every reward source, the training ones and rewards.eval_functions."""
    if not (cfg.ppo.eval_steps and cfg.data.eval_prompts):
        return None
    table = data.load_prompts(cfg.data.eval_prompts, cfg.data.max_samples, name="data.eval_prompts")
    # eval-only functions weigh 0: reported one by one, never part of eval/score (unless also a training function)
    eval_only = cfg.rewards.eval_functions
    timeout = cfg.rewards.timeout_s
    functions = {**rewards.load_reward_functions(eval_only, [0.0] * len(eval_only), timeout_s=timeout),
                 **rewards.load_reward_functions(cfg.rewards.functions, cfg.rewards.function_weights, timeout)}
    scorer = Scorer(model, cfg.rewards.learned_weight, functions, data.prompt_texts(table, model.tokenizer),
                    {c: table[c] for c in table.column_names if c != "prompt"})
    ids = data.encode_prompts(table, model.tokenizer, cfg.data.max_prompt_length, cfg.data.long_prompts,
                              name="data.eval_prompts")
    return HeldOutEval(ids, scorer, cfg.ppo.response_length, stop_ids)


def build_trainer(cfg: RecipeConfig, run_dir: Path, model: RoleModel | None = None, **trainer_kwargs) -> PPOTrainer:
    """Everything PPO needs: roles, the memory plan and its budget, the prompts and the scorer."""
    # data and reward-function errors first: a typo must not wait for a 7B model to load
    table = prompt_data(cfg)
    functions = rewards.load_reward_functions(cfg.rewards.functions, cfg.rewards.function_weights,
                                              timeout_s=cfg.rewards.timeout_s)
    check_reward_accuracy(cfg, run_dir)
    model = model or load_roles(cfg, run_dir)
    memory_plan = plan_recipe(cfg, shape=ModelShape.from_hf_config(model.causal_lm.config))
    enforce_budget(memory_plan.budget_bytes, model.device)
    model.set_gradient_checkpointing(gradient_checkpointing(cfg, memory_plan))
    texts = data.prompt_texts(table, model.tokenizer)
    ids = data.encode_prompts(table, model.tokenizer, cfg.data.max_prompt_length, cfg.data.long_prompts)
    columns = {c: table[c] for c in table.column_names if c != "prompt"}
    log.info("memory plan:\n%s", memory_plan.table())
    trainer_kwargs.setdefault("micro_batches", micro_batches(cfg, memory_plan))
    scorer = Scorer(model, cfg.rewards.learned_weight, functions, texts, columns)
    evaluation = held_out_evaluation(cfg, model, stop_token_ids(model.tokenizer, model.causal_lm.generation_config,
                                                                 cfg.ppo.stop_token))
    return PPOTrainer(model, cfg, ids, scorer, run_dir=run_dir, evaluation=evaluation, **trainer_kwargs)


def run_ppo(cfg: RecipeConfig, run_dir: Path, **trainer_kwargs) -> list[dict]:
    return build_trainer(cfg, run_dir, **trainer_kwargs).train()


def run_stages(cfg: RecipeConfig, stages: list[str], run_dir: Path | None = None, overwrite: bool = False) -> dict:
    """Run the chosen stages in order; returns each stage's summary. Every check comes before the first write:
    a directory of someone else's files, another live process in it, results it would overwrite, bad input."""
    run_dir = Path(run_dir or cfg.run_dir)
    check_writable(run_dir, "--output-dir")
    run_lock.check_free(run_dir)
    check_run_dir(cfg, run_dir, stages, overwrite)
    preflight(cfg, stages, run_dir)
    claim(run_dir, RUN_FILES)  # before writing them: after a kill -9 they are still ours to resume or replace
    with run_lock.hold(run_dir):
        return _run_stages(cfg, stages, run_dir, overwrite)


def _run_stages(cfg: RecipeConfig, stages: list[str], run_dir: Path, overwrite: bool) -> dict:
    save_recipe(cfg, run_dir)
    results: dict = {}
    torch.manual_seed(cfg.seed)
    if "sft" in stages and cfg.sft.enabled:
        results["sft"] = run_sft(cfg, run_dir)
    if "reward" in stages and cfg.reward_model.enabled and cfg.rewards.learned_weight:
        results["reward"] = run_reward(cfg, run_dir)
    if "ppo" in stages:
        if overwrite and not cfg.ppo.resume:  # a fresh PPO run starts from sft, not from the last run's policy
            remove_outputs(run_dir, "ppo")
        history = run_ppo(cfg, run_dir)
        results["ppo"] = {"steps": len(history), "last": history[-1] if history else None}
    if "dpo" in stages:
        if overwrite:  # PPO's checkpoint or best policy beside a DPO policy would describe another policy
            remove_outputs(run_dir, "dpo")
        results["dpo"] = run_dpo(cfg, run_dir)
        if cfg.dpo.enabled and "reward" not in stages and "ppo" not in stages:
            results["skipped"] = DPO_SKIPS
    return results


def remove_outputs(run_dir: Path, stage: str) -> None:
    for path in stage_outputs(run_dir, stage):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
