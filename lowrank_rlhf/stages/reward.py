"""The reward model: a LoRA adapter + scalar head trained with TRL's RewardTrainer (Bradley-Terry) on the same
quantized base that PPO uses, saved so that RoleModel loads it as adapter "reward", and evaluated as PPO scores.

    train_reward(cfg, pairs, RUN, held)   RewardTrainer + LoRA + score -> RUN/reward (plain PEFT) and
                                          RUN/reward/reward_head.safetensors; held-out pairwise accuracy

Data: chosen/rejected with an optional prompt, text or messages. We tokenize the pairs ourselves with
`data.encode_example`, exactly as a PPO rollout lays them out (prompt ids as PPO encodes them, then the answer,
ending with eos and nothing after it), since RoleModel reads the reward at the rollout's last attended token. TRL's
own tokenization renders the whole conversation, and templates put text after the end-of-turn token.

A sequence-classification model reads the score at the rightmost token that is not `pad_token_id`. When pad equals
eos (LLaMA-2 has no pad token) and sequences end in eos, that is the token *before* eos, while PPO reads at the last
attended token: `pooling_pad_id` picks a pad token that ends no training sequence.

The reward adapter starts as a copy of RUN/sft when the run has one (reward_model.init=sft, the default, as
InstructGPT and TRL's examples do: the SFT model already tells right answers from wrong ones), else as a fresh LoRA
adapter; the score head is fresh either way. Its LoRA keys are saved without the score head, in the layout of the
causal LM (LlamaForSequenceClassification and LlamaForCausalLM both call their backbone `model`), so RoleModel loads
it on the shared causal base; the score head (no bias in transformers) is saved as our nn.Linear(hidden, 1) head
with a zero bias.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
from pathlib import Path

import datasets
import peft
import torch
from safetensors.torch import save_file

from ..config import ConfigError, RecipeConfig
from ..data import DataError, encode_example, left_pad
from ..models.loading import (
    check_llama_family,
    compute_dtype,
    keep_one_cpu_4bit_path,
    load_base,
    load_tokenizer,
    quantization_config,
    quiet_weight_loading,
    resolve_device,
    resolve_model_path,
)
from ..models.roles import HEAD_FILES, RoleModel, peft_lora_config
from ..run.checkpoint import verify_adapter, write_atomically
from .common import (
    free,
    loss_summary,
    train_and_save,
    trainable_to_compute_dtype,
    trainer_kwargs,
    update_run_metadata,
    use_loss_bar,
)

log = logging.getLogger(__name__)


# ---- data -------------------------------------------------------------------------------------------------------

def preference_ids(dataset: datasets.Dataset, tokenizer) -> datasets.Dataset:
    """chosen/rejected (prompt optional; text or messages) -> chosen_ids/rejected_ids via `encode_example`."""
    cols = set(dataset.column_names)
    if not {"chosen", "rejected"} <= cols:
        raise DataError(f"data.preferences: preference data needs chosen and rejected columns (prompt optional); "
                        f"got {sorted(cols)}")
    keep = ["margin"] if "margin" in cols else []

    def encode(ex):
        prompt = ex.get("prompt") or ""
        return {"chosen_ids": encode_example(tokenizer, prompt, ex["chosen"]),
                "rejected_ids": encode_example(tokenizer, prompt, ex["rejected"])}
    return dataset.map(encode, remove_columns=[c for c in dataset.column_names if c not in keep],
                       desc="tokenizing pairs")


def within_length(dataset: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """The pairs RewardTrainer keeps: both sides at most max_length tokens."""
    kept = dataset.filter(lambda ex: len(ex["chosen_ids"]) <= max_length and len(ex["rejected_ids"]) <= max_length)
    if len(kept) < len(dataset):
        log.warning("%d of %d preference pairs are longer than %d tokens and are skipped", len(dataset) - len(kept),
                    len(dataset), max_length)
    return kept


def pooling_pad_id(tokenizer, sequences) -> int:
    """A pad id that ends no sequence, so 'rightmost non-pad token' (TRL) = 'last attended token' (RoleModel)."""
    last_tokens = {ids[-1] for ids in sequences if ids}
    for candidate in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id, *range(len(tokenizer))):
        if candidate is not None and candidate not in last_tokens:
            return candidate
    raise ValueError("no token id is free to pad with")  # unreachable for any real vocabulary


# ---- training -----------------------------------------------------------------------------------------------------

def load_reward_base(cfg: RecipeConfig):
    """The base as a LlamaForSequenceClassification (num_labels=1), quantized exactly as `load_base` does."""
    from transformers import AutoModelForSequenceClassification

    path = resolve_model_path(cfg.model.name)
    check_llama_family(path, cfg.model.trust_remote_code)
    device = resolve_device(cfg.model.device)
    dtype = compute_dtype(cfg.model.dtype, device)
    try:  # silences the expected "score.weight missing / lm_head.weight unexpected" load report
        from trl.trainer.reward_trainer import suppress_seqcls_warning
    except ImportError:
        suppress_seqcls_warning = contextlib.nullcontext
    torch.manual_seed(cfg.seed)  # the score head is initialised randomly
    with suppress_seqcls_warning(), quiet_weight_loading():
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=dtype, quantization_config=quantization_config(cfg.model.quantization, dtype),
            device_map={"": device}, trust_remote_code=cfg.model.trust_remote_code)
    model.requires_grad_(False)
    if device.type == "cpu":
        keep_one_cpu_4bit_path(model)
    tokenizer = load_tokenizer(path, cfg.model.trust_remote_code)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def reward_lora_config(cfg: RecipeConfig) -> peft.LoraConfig:
    config = peft_lora_config(cfg.lora)
    config.task_type = "SEQ_CLS"  # PEFT then keeps a trainable copy of `score` (modules_to_save)
    config.modules_to_save = ["score"]
    return config


def reward_from_sft(model, cfg: RecipeConfig, source: Path):
    """The seq-cls base with a SEQ_CLS LoRA adapter (a trainable copy of a fresh `score`) whose LoRA weights are
    RUN/sft's. The causal LM and the seq-cls model both call their backbone `model`, so the sft adapter's keys fit
    as they are; PEFT's loader wants every modules_to_save weight in the state dict, so the fresh score goes in too."""
    from safetensors.torch import load_file

    verify_adapter(Path(source).parent)
    model = peft.get_peft_model(model, reward_lora_config(cfg))
    state = load_file(str(source), device=str(model.device))
    state.update({k: v for k, v in peft.get_peft_model_state_dict(model).items() if "lora_" not in k})  # score
    result = peft.set_peft_model_state_dict(model, state)
    if result.unexpected_keys or any("lora_" in k for k in result.missing_keys):
        raise ConfigError(f"reward_model.init: {source} does not fit the reward adapter (LoRA settings differ?); "
                          f"set reward_model.init=fresh or retrain sft with the recipe's lora settings")
    return model


def reward_trainer(cfg: RecipeConfig, dataset: datasets.Dataset, output_dir: str | Path,
                   run_dir: str | Path | None = None):
    """RewardTrainer (Bradley-Terry) with a LoRA adapter + score head on the shared quantized base: a copy of
    RUN/sft (reward_model.init=sft and the run has one) or a fresh adapter."""
    from trl import RewardConfig, RewardTrainer

    model, tokenizer = load_reward_base(cfg)
    peft_config, kept = reward_lora_config(cfg), {}
    source = Path(run_dir or cfg.run_dir) / "sft" / "adapter_model.safetensors"
    if cfg.reward_model.init == "sft" and source.is_file():
        model, peft_config = reward_from_sft(model, cfg, source), None
        # TRL rounds the trainable weights through bf16 (below); keep the sft weights exact
        kept = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    elif cfg.reward_model.init == "sft":
        log.info("reward_model.init=sft but %s has no sft adapter: the reward adapter starts fresh", source.parent)
    pairs = within_length(preference_ids(dataset, tokenizer), cfg.reward_model.max_length)
    if len(pairs) == 0:
        raise ConfigError(f"reward_model.max_length: no preference pair fits in {cfg.reward_model.max_length} "
                        f"tokens; raise it or shorten the data")
    pad_id = pooling_pad_id(tokenizer, list(pairs["chosen_ids"]) + list(pairs["rejected_ids"]))
    args = RewardConfig(**trainer_kwargs(cfg, cfg.reward_model, str(output_dir)),
                        pad_token=tokenizer.convert_ids_to_tokens(pad_id))
    trainer = RewardTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer,
                            peft_config=peft_config)
    # TRL 1.16 casts LoRA and the score head to bf16 on a quantized model even with bf16=False (common.py).
    trainable_to_compute_dtype(trainer.model, compute_dtype(cfg.model.dtype, model.device))
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if name in kept and param.dtype == kept[name].dtype:
                param.copy_(kept[name])
    use_loss_bar(trainer)
    return trainer


def save_reward(trainer, cfg: RecipeConfig, run_dir: str | Path) -> Path:
    """LoRA weights (no score) -> RUN/reward as a causal-LM PEFT adapter; score -> RUN/reward/reward_head."""
    run_dir = Path(run_dir)
    model = trainer.model
    state = peft.get_peft_model_state_dict(model)
    lora = {k: v.detach().contiguous().cpu() for k, v in state.items() if "lora_" in k}
    score = model.base_model.model.score  # ModulesToSaveWrapper: its active copy is the trained one
    weight = score.modules_to_save["default"].weight if hasattr(score, "modules_to_save") else score.weight
    causal = copy.deepcopy(model.peft_config["default"])  # target_modules already resolved to module names
    causal.task_type, causal.modules_to_save = "CAUSAL_LM", None
    head = {"weight": weight.detach().float().reshape(1, -1).contiguous().cpu(), "bias": torch.zeros(1)}

    def write(tmp: Path) -> None:
        causal.save_pretrained(str(tmp))
        save_file(lora, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        save_file(head, str(tmp / HEAD_FILES["reward"]))

    write_atomically(run_dir / "reward", write)
    update_run_metadata(run_dir, model.get_base_model().config, cfg, "reward", head="reward")
    return run_dir / "reward"


def train_reward(cfg: RecipeConfig, dataset: datasets.Dataset, run_dir: str | Path,
                 eval_dataset: datasets.Dataset | None = None, eval_prompts: datasets.Dataset | None = None) -> dict:
    """Train the reward adapter + head; writes RUN/reward. The held-out evaluation goes through RoleModel, as PPO
    scores: accuracy and margin on eval_dataset (overall and per kind) and, on eval_prompts with a yes/no `label`,
    whether r(yes) - r(no) follows the label; written to RUN/reward/eval.json."""
    run_dir = Path(run_dir)
    start = time.perf_counter()
    trainer, result = train_and_save(cfg, run_dir, "reward", lambda out: reward_trainer(cfg, dataset, out, run_dir),
                                     save_reward)
    metrics = {**loss_summary(trainer, result), "pairs": len(trainer.train_dataset)}
    accuracies = [e["accuracy"] for e in trainer.state.log_history if "accuracy" in e]
    metrics["train_accuracy_last"] = accuracies[-1] if accuracies else float("nan")
    train_seconds = time.perf_counter() - start
    del trainer  # before a second base is loaded for the evaluation
    free()
    held_out = eval_dataset is not None and len(eval_dataset) > 0
    evaluation = evaluate_reward(cfg, run_dir, eval_dataset, eval_prompts) if held_out or eval_prompts else {}
    metrics["eval_accuracy"] = evaluation.get("accuracy")
    metrics["eval_pairs"] = len(eval_dataset) if held_out else 0
    metrics["eval"] = evaluation
    metrics["train_seconds"] = train_seconds
    metrics["seconds"] = time.perf_counter() - start
    (run_dir / "reward" / "eval.json").write_text(json.dumps(evaluation, indent=2))
    if metrics["eval_accuracy"] is not None and math.isnan(metrics["eval_accuracy"]):
        log.warning("no held-out pair fits reward_model.max_length; eval_accuracy is nan")
    dependence = evaluation.get("yes_minus_no")
    if dependence and not dependence["reads_prompt"]:
        log.warning("the reward model does not read the prompt: r(yes) - r(no) is %+.3f on yes-labelled and %+.3f on "
                    "no-labelled held-out prompts (it should change sign); PPO would learn one answer for all",
                    dependence["gap_yes"], dependence["gap_no"])
    return metrics


# ---- evaluation, as PPO scores ------------------------------------------------------------------------------------

def score_sequences(model: RoleModel, sequences: list[list[int]], batch_size: int = 16) -> torch.Tensor:
    """Rewards of token-id sequences through RoleModel.rewards (reward adapter + head), left-padded, no grad."""
    ids, mask = left_pad(sequences, model.tokenizer.pad_token_id or 0)
    return model.rewards(ids.to(model.device), mask.to(model.device), micro_batch=batch_size).float().cpu()


def pairwise_stats(model: RoleModel, dataset: datasets.Dataset, max_length: int, batch_size: int = 16) -> dict:
    """Pairwise accuracy and mean margin r(chosen) - r(rejected), overall and per `kind` column value if any: an
    average over easy format pairs and hard label pairs hides a reward that never reads the prompt."""
    kinds = list(dataset["kind"]) if "kind" in dataset.column_names else None
    ids = preference_ids(dataset, model.tokenizer)
    keep = [i for i, ex in enumerate(ids) if len(ex["chosen_ids"]) <= max_length and
            len(ex["rejected_ids"]) <= max_length]
    if not keep:
        return {"accuracy": float("nan"), "margin": float("nan"), "pairs": 0}
    ids = ids.select(keep)
    margin = (score_sequences(model, ids["chosen_ids"], batch_size) -
              score_sequences(model, ids["rejected_ids"], batch_size))
    stats = {"accuracy": (margin > 0).float().mean().item(), "margin": margin.mean().item(), "pairs": len(keep)}
    for kind in sorted(set(kinds or [])):
        m = margin[torch.tensor([kinds[i] == kind for i in keep])]
        stats[kind] = {"accuracy": (m > 0).float().mean().item(), "margin": m.mean().item(), "pairs": len(m)}
    return stats


def answer_dependence(model: RoleModel, prompts: datasets.Dataset, answers=("yes", "no"),
                      batch_size: int = 16) -> dict:
    """Does the reward read the prompt? gap = r(answers[0]) - r(answers[1]) per prompt, averaged over the prompts of
    each `label`: a reward that follows the label has gaps of opposite signs (`reads_prompt`). Also the share of
    prompts whose gap sign picks the label (the reward used as a classifier)."""
    tok = model.tokenizer
    first = score_sequences(model, [encode_example(tok, p, answers[0]) for p in prompts["prompt"]], batch_size)
    second = score_sequences(model, [encode_example(tok, p, answers[1]) for p in prompts["prompt"]], batch_size)
    gap, labels = first - second, list(prompts["label"])
    out = {f"gap_{label}": gap[torch.tensor([y == label for y in labels])].mean().item() for label in answers}
    out["reads_prompt"] = out[f"gap_{answers[0]}"] > 0 > out[f"gap_{answers[1]}"]
    out["label_accuracy"] = sum((g > 0) == (y == answers[0]) for g, y in zip(gap.tolist(), labels)) / len(labels)
    return out


def evaluate_reward(cfg: RecipeConfig, run_dir: str | Path, dataset: datasets.Dataset | None,
                    prompts: datasets.Dataset | None = None) -> dict:
    """RUN/reward, loaded onto a fresh causal base exactly as PPO loads it: pairwise accuracy and margin on held-out
    pairs (overall and per kind) and, given prompts with a yes/no `label` column, `answer_dependence` on them."""
    base, tokenizer = load_base(cfg.model)
    model = RoleModel.load(base, tokenizer, run_dir, cfg.lora, base_name=cfg.model.name,
                           quantization=cfg.model.quantization, roles=("reward",), trainable=())
    batch = 2 * cfg.reward_model.batch_size
    out = {}
    if dataset is not None and len(dataset) > 0:
        out.update(pairwise_stats(model, dataset, cfg.reward_model.max_length, batch))
    if prompts is not None and "label" in prompts.column_names and set(prompts["label"]) <= {"yes", "no"}:
        out["yes_minus_no"] = answer_dependence(model, prompts, batch_size=batch)
    del model, base
    free()
    return out
