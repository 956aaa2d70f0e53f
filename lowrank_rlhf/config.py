"""Recipe configuration: one dataclass per concern, loaded strictly from YAML plus key=value overrides.

Every field carries a one-line help text (TRL style) and, where it matters, its allowed values or range.
Unknown keys are an error that names the nearest valid key: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe problem, reported in one line that names the file, the key and the allowed values."""


def opt(default: Any, help: str, choices: tuple | None = None, low: float | None = None,
        high: float | None = None) -> Any:
    """A dataclass field with its help line and validation rules in the metadata."""
    meta = {"help": help, "choices": choices, "low": low, "high": high}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: str = opt("tiny-llama", "tiny-llama | smollm2-135m | a local path or hub id of a LLaMA-family causal LM")
    quantization: str = opt("4bit", "how the shared base is stored", choices=("4bit", "8bit", "none"))
    dtype: str = opt("auto", "compute dtype; auto = bfloat16 on CUDA, float32 on CPU",
                     choices=("auto", "bfloat16", "float16", "float32"))
    device: str = opt("auto", "where the base lives; auto = cuda if available else cpu",
                      choices=("auto", "cuda", "cpu"))
    trust_remote_code: bool = opt(False, "run model code from the hub; off unless a recipe turns it on")
    max_length: int = opt(1024, "longest prompt + response the model is asked to handle", low=8)


@dataclass
class LoraConfig:
    r: int = opt(16, "LoRA rank of every role adapter", low=1)
    alpha: int = opt(32, "LoRA alpha (scaling = alpha / r)", low=1)
    dropout: float = opt(0.0, "LoRA dropout; 0 keeps PPO's logprobs deterministic", low=0.0, high=1.0)
    target_modules: list = opt(["all-linear"], "linear layers that get adapters; all-linear = every one but lm_head")
    critic: str = opt("separate", "separate = value role has its own adapter; shared = value head on the policy",
                      choices=("separate", "shared"))
    critic_init: str = opt("reward", "where a separate critic starts: reward = a copy of the reward adapter and head "
                           "(as TRL and OpenRLHF do), fresh = a new adapter and a random head",
                           choices=("reward", "fresh"))
    frozen_dtype: str = opt("float32", "dtype of the frozen adapters (sft reference, reward): float32 = as PEFT keeps "
                            "them on a quantized base; compute = model.dtype (bf16 on a GPU), half their memory. "
                            "Trained adapters stay float32", choices=("float32", "compute"))


@dataclass
class MemoryConfig:
    budget: str = opt("auto", "memory budget, e.g. 24GiB; auto = the device's free memory (on CUDA enforced "
                              "with set_per_process_memory_fraction)")
    gradient_checkpointing: str = opt("auto", "auto = the planner decides", choices=("auto", "on", "off"))
    micro_batch: dict = opt({}, "fixed micro-batch per phase (generate/score/train), skipping the planner")


@dataclass
class DataConfig:
    sft: str = opt("", "SFT data: json/jsonl/csv/parquet file, saved dataset dir, hub id or bundled:NAME; "
                       "prompt/completion or messages columns; in every data key, sources joined by commas are mixed")
    preferences: str = opt("", "preference pairs for the reward model: chosen/rejected columns (prompt optional)")
    prompts: str = opt("", "PPO prompts: a prompt column (text or messages)")
    eval_prompts: str = opt("", "held-out prompts for before/after reports; empty = none")
    eval_fraction: float = opt(0.1, "share of the preference pairs held out to report reward accuracy",
                               low=0.0, high=0.9)
    max_prompt_length: int = opt(256, "longest prompt in tokens", low=1)
    long_prompts: str = opt("truncate", "what to do with longer prompts: truncate (from the left, with a warning) "
                                        "or error", choices=("truncate", "error"))
    max_samples: int = opt(0, "use at most this many rows of each dataset; 0 = all", low=0)


@dataclass
class _TrainedStageConfig:
    """What the SFT and reward stages share; each names its own defaults and help below."""

    epochs: float = opt(1.0, "passes over the stage's data", low=0.0)
    max_steps: int = opt(-1, "stop after this many optimizer steps; -1 = run all epochs", low=-1)
    gradient_accumulation_steps: int = opt(1, "micro-steps per optimizer step", low=1)
    save_steps: int = opt(0, "save a checkpoint (adapter, optimizer, scheduler, RNG, data position) every N optimizer "
                          "steps into RUN/checkpoint-<stage>; 0 = only when stopped by SIGTERM/Ctrl-C", low=0)
    save_total_limit: int = opt(2, "keep the newest N checkpoints of the stage", low=1)
    resume: bool = opt(False, "continue the stage from its newest complete checkpoint (same recipe)")


@dataclass
class SFTStageConfig(_TrainedStageConfig):
    enabled: bool = opt(True, "run the SFT stage (TRL SFTTrainer, LoRA on the shared quantized base)")
    learning_rate: float = opt(2e-4, "AdamW learning rate", low=0.0)
    batch_size: int = opt(8, "examples per optimizer step (per device)", low=1)
    max_length: int = opt(512, "longest tokenized example", low=8)


@dataclass
class RewardModelStageConfig(_TrainedStageConfig):
    enabled: bool = opt(True, "run the reward stage (TRL RewardTrainer, Bradley-Terry, LoRA + scalar head)")
    learning_rate: float = opt(1e-4, "AdamW learning rate", low=0.0)
    batch_size: int = opt(8, "pairs per optimizer step (per device)", low=1)
    max_length: int = opt(512, "longest tokenized prompt + answer", low=8)
    init: str = opt("sft", "where the reward adapter starts: sft = a copy of RUN/sft when the run has one (as "
                    "InstructGPT), fresh = a new adapter", choices=("sft", "fresh"))
    min_accuracy: float | None = opt(None, "PPO refuses to start when the reward model's held-out pairwise accuracy "
                                     "(RUN/reward/eval.json) is below this; null = no check", low=0.0, high=1.0)


@dataclass
class DPOStageConfig(_TrainedStageConfig):
    enabled: bool = opt(False, "run the DPO stage (TRL DPOTrainer on data.preferences): the policy adapter starts "
                        "from RUN/sft, the reference is a frozen copy of it; writes RUN/policy like online RL")
    learning_rate: float = opt(5e-5, "AdamW learning rate", low=0.0)
    batch_size: int = opt(8, "pairs per optimizer step (per device)", low=1)
    max_length: int = opt(512, "longest tokenized prompt + answer", low=8)
    beta: float = opt(0.1, "DPO temperature (TRL's name): how far the policy may move from the reference", low=0.0)
    loss_type: str = opt("sigmoid", "TRL's DPO loss: sigmoid = the DPO paper, ipo, hinge, robust",
                         choices=("sigmoid", "ipo", "hinge", "robust"))


@dataclass
class RewardsConfig:
    learned_weight: float = opt(1.0, "weight of the learned reward adapter in the PPO score; 0 = not used")
    functions: list = opt([], "Python reward functions as module:function(prompts, completions) -> list[float]")
    function_weights: list = opt([], "one weight per function; empty = 1.0 each")
    eval_functions: list = opt([], "Python functions scored on the held-out prompts only (never part of the PPO "
                               "score), e.g. a verifiable accuracy beside a learned reward")
    timeout_s: float | None = opt(600.0, "seconds each reward-function call may take before the run stops with an "
                                  "error naming it; null = no limit", low=0.001)


GROUP_DEFAULT_GENERATIONS = 4  # grpo/rloo's samples per prompt when a recipe does not say


@dataclass
class PPOConfig:
    total_steps: int = opt(10, "PPO steps (one rollout batch each)", low=1)
    rollout_batch_size: int = opt(8, "responses generated and scored per PPO step", low=1)
    num_generations: int = opt(1, "responses sampled per prompt (TRL's name); rollout_batch_size must be divisible "
                               "by it; grpo and rloo need >= 2 (the other samples of a prompt are the baseline): "
                               f"left unset, they take {GROUP_DEFAULT_GENERATIONS} (or 2 where the batch is not "
                               "divisible by it)", low=1)
    algorithm: str = opt("ppo", "ppo = GAE with a critic (kl_coef, cliprange); grpo = group-normalised advantages, KL "
                         "in the loss; rloo = leave-one-out baseline; reinforce_pp = batch-whitened returns, KL in "
                         "the reward. The last three load, plan and save no value role (rl/algorithms.py)",
                         choices=("ppo", "grpo", "rloo", "reinforce_pp"))
    beta: float = opt(0.04, "KL coefficient of grpo/rloo/reinforce_pp (TRL's name; ppo uses kl_coef); 0 = no "
                      "reference forward at all, objective/kl is then logged as 0", low=0.0)
    epsilon: float = opt(0.2, "lower clip range of the policy ratio for grpo/rloo/reinforce_pp (ppo uses cliprange)",
                         low=0.0)
    epsilon_high: float | None = opt(None, "upper clip range (DAPO's clip-higher, e.g. 0.28); null = epsilon",
                                     low=0.0)
    loss_type: str = opt("dapo", "how grpo/rloo/reinforce_pp average token losses: grpo = per-sequence mean then "
                         "batch mean; dr_grpo = sum / (rows x response_length); dapo = over the tokens of all ranks; "
                         "bnpo = over this rank's tokens (ppo: always a token mean, as TRL's PPO)",
                         choices=("grpo", "dr_grpo", "dapo", "bnpo"))
    scale_rewards: str = opt("group", "grpo: divide advantages by the std of the prompt's group, of the batch, or "
                             "none (Dr. GRPO)", choices=("group", "batch", "none"))
    mask_truncated_completions: bool = opt(False, "responses without a stop token add no loss (they still count "
                                           "in the baselines); every algorithm")
    num_mini_batches: int = opt(1, "minibatches per PPO epoch (optimizer steps per epoch)", low=1)
    num_ppo_epochs: int = opt(4, "passes over each rollout batch", low=1)
    response_length: int = opt(53, "new tokens generated per prompt", low=1)
    temperature: float = opt(0.7, "sampling temperature; logprobs use the same temperature", low=1e-3)
    decode: str = opt("generate", "rollout decoding: generate = transformers' generate(); static = a fixed-size KV "
                      "cache; static-compiled = that, with the decode step compiled (CUDA graphs on a GPU)",
                      choices=("generate", "static", "static-compiled"))
    stop_token: list = opt(["eos"], "where responses end: eos = every eos id of the model and the chat template's "
                           "end-of-turn token; none = keep all tokens; or token strings, e.g. [<|eot_id|>]")
    missing_eos_penalty: float | None = opt(None, "subtracted from the score of responses without eos; null = off")
    kl_coef: float = opt(0.05, "initial KL penalty coefficient", low=0.0)
    kl_estimator: str = opt("k1", "per-token KL estimator", choices=("k1", "k3"))
    adaptive_kl: bool = opt(False, "adapt kl_coef towards kl_target (Ziegler et al. 2019)")
    kl_target: float = opt(6.0, "target KL for the adaptive controller", low=0.0)
    kl_horizon: int = opt(10000, "horizon of the adaptive controller", low=1)
    cliprange: float = opt(0.2, "policy ratio clip range", low=0.0)
    cliprange_value: float = opt(0.2, "value clip range", low=0.0)
    vf_coef: float = opt(0.1, "value loss coefficient", low=0.0)
    gamma: float = opt(1.0, "discount factor", low=0.0, high=1.0)
    lam: float = opt(0.95, "GAE lambda", low=0.0, high=1.0)
    whiten_rewards: bool = opt(False, "whiten per-token rewards before GAE")
    normalize_scores: bool = opt(False, "normalize scores with running mean and std")
    score_clip: float | None = opt(None, "clip (normalized) scores to [-score_clip, score_clip]; null = off")
    learning_rate: float = opt(1e-5, "policy adapter learning rate", low=0.0)
    optim: str = opt("adamw", "optimizer of the trained roles (TRL's name): adamw = torch AdamW, fp32 states; "
                     "adamw_8bit = bitsandbytes' 8-bit states (a quarter of the memory); paged_adamw_8bit = that, "
                     "paged to CPU memory when the GPU runs short", choices=("adamw", "adamw_8bit", "paged_adamw_8bit"))
    logits_chunk_tokens: int = opt(0, "scoring and training compute lm_head, log-softmax and entropy for at most this "
                                   "many response tokens at a time, so a 128k-152k vocabulary costs a chunk, not a "
                                   "micro-batch; 0 = the whole micro-batch at once", low=0)
    value_learning_rate: float = opt(1e-5, "value adapter and head learning rate", low=0.0)
    lr_scheduler_type: str = opt("linear", "learning-rate schedule over all PPO updates",
                                 choices=("linear", "constant"))
    max_grad_norm: float = opt(1.0, "gradient clipping norm, applied to each role", low=0.0)
    weight_decay: float = opt(0.0, "AdamW weight decay; it pulls adapters toward the base, not the reference, so 0 "
                              "(as TRL)", low=0.0)
    eval_steps: int = opt(0, "every N steps answer data.eval_prompts greedily and log eval/* metrics; 0 = off", low=0)
    best_metric: str = opt("", "eval metric that picks RUN/best, e.g. eval/clickbait_accuracy; empty = the first "
                           "reward function, else eval/score")
    overoptimization_patience: int = opt(2, "warn when eval/score (what PPO maximises) rose while best_metric fell "
                                         "for this many evaluations in a row", low=1)
    stop_on_overoptimization: bool = opt(False, "stop (keeping RUN/best) when the over-optimisation alarm fires")
    load_best_at_end: bool = opt(False, "RUN/policy is RUN/best's policy at the end (transformers' "
                                 "load_best_model_at_end); the last step's stays in RUN/checkpoint")
    save_steps: int = opt(0, "checkpoint every N steps; 0 = only at the end and on Ctrl-C", low=0)
    resume: bool = opt(False, "continue from the run directory's last checkpoint")
    max_nan_skips: int = opt(3, "stop after this many non-finite updates in a row", low=1)
    report_to: str = opt("none", "extra metric sink besides metrics.jsonl", choices=("none", "tensorboard", "wandb"))


RLConfig = PPOConfig  # online RL's settings, whichever ppo.algorithm (the recipe section is rl: or ppo:)


@dataclass
class RecipeConfig:
    """The whole recipe. Sections group settings by concern, as in alignment-handbook recipes."""

    run_dir: str = opt("runs/default", "where adapters, heads, checkpoints and metrics are written")
    seed: int = opt(0, "seed for torch, python and numpy", low=0)
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "the shared base"})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "the role adapters"})
    memory: MemoryConfig = field(default_factory=MemoryConfig, metadata={"help": "memory budget and planner"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "datasets for every stage"})
    sft: SFTStageConfig = field(default_factory=SFTStageConfig, metadata={"help": "the SFT stage"})
    reward_model: RewardModelStageConfig = field(default_factory=RewardModelStageConfig,
                                                 metadata={"help": "the reward-model stage"})
    dpo: DPOStageConfig = field(default_factory=DPOStageConfig, metadata={"help": "the DPO stage (offline, "
                                                                          "instead of reward model + online RL)"})
    rewards: RewardsConfig = field(default_factory=RewardsConfig, metadata={"help": "PPO reward sources"})
    ppo: PPOConfig = field(default_factory=PPOConfig, metadata={"help": "the PPO stage (TRL names)"})


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and gently convert, int -> float) a YAML value against a field type; raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # PyYAML (YAML 1.1) reads 1e-5 as a string; every ML recipe writes it that way
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is list and isinstance(value, str):
        return [value]
    base = origin or tp
    if isinstance(base, type) and not isinstance(value, base):
        raise ConfigError(f"{where}: expected {_type_name(base)}, got {type(value).__name__} {value!r}")
    return value


def _check_range(value: Any, meta: dict, where: str) -> None:
    choices, low, high = meta.get("choices"), meta.get("low"), meta.get("high")
    if value is None:  # an optional setting left off (null): nothing to check
        return
    if choices and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not allowed; allowed values: {', '.join(map(str, choices))}")
    if low is not None and value < low or high is not None and value > high:
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ConfigError(f"{where}: {value!r} is out of range; allowed range: {bounds}")


def build(cls: type, data: dict | None, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping, strictly: unknown keys, wrong types and bad values all raise."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'recipe'}: expected a mapping of keys, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"{where}{key}: unknown key{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        tp, path = hints[name], f"{where}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, data[name], f"{path}.")
        else:
            value = data[name]
            if isinstance(value, bool) and {"on", "off"} <= set(f.metadata.get("choices") or ()):
                value = "on" if value else "off"  # YAML 1.1 reads a bare on/off (yes/no) as a boolean
            value = _coerce(value, tp, path)
            _check_range(value, f.metadata, path)
            kwargs[name] = value
    return cls(**kwargs)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    node = data
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{part}' is not a section")
    node[last] = value


def parse_overrides(items: list[str]) -> dict:
    """['ppo.kl_coef=0.1', 'model.quantization=8bit'] -> nested dict; values parsed as YAML scalars."""
    data: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. ppo.kl_coef=0.05")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw else "")
    return data


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _rl_as_ppo(data: dict, label: str) -> dict:
    """`rl:` is the online-RL section by its own name (it runs grpo, rloo and reinforce_pp too); its keys are TRL's
    and live in PPOConfig, whose old section name `ppo:` stays accepted."""
    if not isinstance(data, dict) or "rl" not in data:
        return data
    if "ppo" in data:
        raise ConfigError(f"{label}: rl and ppo are the same section (online RL); use one of them")
    return {("ppo" if key == "rl" else key): value for key, value in data.items()}


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> RecipeConfig:
    """Read a recipe YAML (or defaults when path is None), apply key=value overrides, validate strictly."""
    data: dict = {}
    label = "defaults"
    if path is not None:
        label = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{label}: recipe file not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{label}: not valid YAML ({str(err).splitlines()[0]})") from None
    data = _merge(_rl_as_ppo(data, label), _rl_as_ppo(parse_overrides(overrides or []), "overrides"))
    try:
        cfg = build(RecipeConfig, data)
    except ConfigError as err:
        raise ConfigError(f"{label}: {err}") from None
    ppo_keys = data.get("ppo") if isinstance(data.get("ppo"), dict) else {}
    if cfg.ppo.algorithm in GROUP_BASELINES and "num_generations" not in ppo_keys:
        # as TRL's GRPOConfig, a group algorithm works without naming its group size
        divisible = cfg.ppo.rollout_batch_size % GROUP_DEFAULT_GENERATIONS == 0
        cfg.ppo.num_generations = GROUP_DEFAULT_GENERATIONS if divisible else 2
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------- algorithm rules
# Which algorithm needs a critic, a reference forward or its own old-logprob forward: read by the planner (memory),
# the trainer (rl) and the preflight alike, so they live with the config they interpret.
CRITIC_FREE = ("grpo", "rloo", "reinforce_pp")
GROUP_BASELINES = ("grpo", "rloo")  # need num_generations >= 2


def has_critic(algorithm: str) -> bool:
    return algorithm not in CRITIC_FREE


def needs_reference(ppo: PPOConfig) -> bool:
    """PPO always measures KL; the critic-free algorithms skip the reference forward when beta is 0 (as TRL)."""
    return has_critic(ppo.algorithm) or ppo.beta > 0


def kl_in_loss(ppo: PPOConfig) -> bool:
    return ppo.algorithm == "grpo" and ppo.beta > 0


def old_logprobs_from_update(ppo: PPOConfig) -> bool:
    """One update per rollout (one epoch, one minibatch) and no KL in the reward: the policy being updated IS the
    one that sampled, so the ratio is exactly 1 and the "old" logprobs are the update's own forward, detached.
    The score phase then skips its policy forward (TRL's GRPOTrainer skips it likewise when num_iterations=1); the
    update writes those logprobs back for the step's metrics. rloo/reinforce_pp with beta > 0 need the policy's
    logprobs before the update (their KL goes into the reward), so they keep the forward."""
    return (not has_critic(ppo.algorithm) and ppo.num_ppo_epochs == 1 and ppo.num_mini_batches == 1
            and (ppo.beta == 0 or kl_in_loss(ppo)))


def check_algorithm(ppo: PPOConfig) -> None:
    if ppo.algorithm in GROUP_BASELINES and ppo.num_generations < 2:
        raise ConfigError(f"ppo.num_generations: {ppo.algorithm} needs at least 2 samples per prompt (the others "
                          f"are its baseline), got {ppo.num_generations}")
    if ppo.mask_truncated_completions and ppo.stop_token == ["none"]:
        raise ConfigError("ppo.mask_truncated_completions: with ppo.stop_token=[none] no response has a stop token, "
                          "so every loss would be masked; set ppo.stop_token (eos or token strings) or turn it off")
