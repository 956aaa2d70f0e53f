"""The SFT and reward-model stages, through TRL, on the same quantized base that PPO uses.

    train_sft(cfg, dataset, RUN)          SFTTrainer + LoRA            -> RUN/sft (plain PEFT; policy and reference
                                                                          start as copies of it)
    train_reward(cfg, pairs, RUN, held)   RewardTrainer + LoRA + score -> RUN/reward (plain PEFT) and
                                                                          RUN/reward/reward_head.safetensors

Both write or merge RUN/lowrank_rlhf.json, so `RoleModel.load(base, tok, RUN, ...)` rebuilds the roles afterwards.

Data follows the convention of PPO's prompts (data.encode_prompts): conversations (lists of {"role", "content"})
go through the tokenizer's chat template, plain text stays plain text.
  - SFT: prompt/completion (text or messages) or a `messages` column, which is split before its last assistant
    message (earlier turns are the prompt; SFT trains on that last turn). The loss is on the completion only, via
    TRL's completion_only_loss, which works with any template (assistant_only_loss needs {% generation %} markers
    that most templates lack).
  - Reward: chosen/rejected with an optional prompt. We tokenize the pairs ourselves (`encode_example`) exactly as
    a PPO rollout lays them out: the prompt's ids as PPO encodes them, then the answer, ending with eos and nothing
    after it, since the rollout's attention mask ends at eos and RoleModel reads the reward there. TRL's own
    tokenization renders the whole conversation, and templates put text after the end-of-turn token (ChatML's
    newline, tiny-llama's too): the reward would be trained at a token PPO never scores.

The reward adapter is a fresh LoRA adapter on the base, not a copy of sft: it is simple, does not depend on the
order the stages run in, and a reward model does not need to generate. Its LoRA keys are saved without the score
head, in the layout of the causal LM (LlamaForSequenceClassification and LlamaForCausalLM both call their backbone
`model`), so RoleModel loads it on the shared causal base as adapter "reward"; the score head (no bias in
transformers) is saved as our nn.Linear(hidden, 1) head with a zero bias.

TRL quirks handled here (trl 1.16):
  - On a 4-bit/8-bit model both trainers cast every trainable parameter (LoRA and the `score` head) to bfloat16,
    even with bf16=False. On CPU the hidden states stay float32 and the score head fails ("expected m1 and m2 to
    have the same dtype"); LoRA silently runs in bf16. We cast the trainable parameters back to the compute dtype
    (bf16 on CUDA, as TRL wants; float32 on CPU) after the trainer is built, before train(). An unquantized base
    is left alone: TRL does not cast there.
  - TRL's config defaults are bf16=True and gradient_checkpointing=True; both are set explicitly here.
  - A sequence-classification model reads the score at the rightmost token that is not `pad_token_id`. When pad
    equals eos (LLaMA-2 has no pad token) and sequences end in eos, that is the token *before* eos, while PPO reads
    at the last attended token. The reward stage pads with a token that ends no training sequence.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path

import datasets
import peft
import torch
from safetensors.torch import save_file
from transformers.trainer_callback import ProgressCallback

from ..checkpoint import write_atomically
from ..config import ConfigError, RecipeConfig
from ..models.loading import (check_llama_family, compute_dtype, keep_one_cpu_4bit_path, load_base, load_tokenizer,
                     quantization_config, resolve_device, resolve_model_path)
from ..models.roles import HEAD_FILES, RoleModel, peft_lora_config
from ..models.run_metadata import META_FILE, base_fingerprint, check_base

log = logging.getLogger(__name__)


# ---- data -------------------------------------------------------------------------------------------------------

def is_messages(value) -> bool:
    """A list of {role, content} messages (TRL's conversational format)."""
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value)


def split_messages(messages: list) -> tuple[list, list]:
    """A conversation -> (everything before the last assistant turn, [that turn])."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ConfigError("a conversation has no assistant message to train on")
    return list(messages[:last]), [messages[last]]


def answer_text(completion) -> str:
    """A completion as text: a string as is, a conversation as its assistant contents."""
    if isinstance(completion, str):
        return completion
    if is_messages(completion):
        return "\n".join(str(m["content"]) for m in completion if m["role"] == "assistant")
    raise ConfigError(f"a completion must be text or a list of {{role, content}} messages, got {completion!r:.80}")


def prompt_part(prompt, completion) -> tuple:
    """(prompt, completion) with an implicit prompt (a whole conversation as completion) made explicit."""
    if not prompt and is_messages(completion):
        return split_messages(completion)
    return prompt or "", completion


def prompt_text(tokenizer, prompt) -> str:
    """A prompt as PPO renders it (data.prompt_texts): a conversation through the chat template with the assistant
    turn opened, plain text unchanged."""
    if is_messages(prompt):
        return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    return prompt


def prompt_ids(tokenizer, prompt) -> list[int]:
    """A prompt's token ids as PPO encodes them (data.encode_prompts): no extra special tokens after a chat
    template (it has its own), the tokenizer's usual ones (e.g. LLaMA's BOS) for plain text."""
    return list(tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=not is_messages(prompt))["input_ids"])


def render_example(tokenizer, prompt, completion) -> str:
    """prompt + completion as the text PPO's reward sees: the rendered prompt, the answer, eos, nothing after."""
    prompt, completion = prompt_part(prompt, completion)
    text = prompt_text(tokenizer, prompt) + answer_text(completion)
    return text if text.endswith(tokenizer.eos_token) else text + tokenizer.eos_token


def encode_example(tokenizer, prompt, completion) -> list[int]:
    """Token ids of `render_example` laid out as in a PPO rollout: prompt ids (`prompt_ids`), then the answer's
    ids, ending with eos, where the rollout's attention mask ends and RoleModel reads the reward.

    Not TRL's own tokenization: TRL renders a whole conversation, and templates add text after the assistant's
    end-of-turn token (ChatML's newline), so the reward would be trained at a token PPO never scores."""
    prompt, completion = prompt_part(prompt, completion)
    answer = tokenizer(answer_text(completion), add_special_tokens=False)["input_ids"]
    ids = prompt_ids(tokenizer, prompt) + list(answer)
    return ids if ids and ids[-1] == tokenizer.eos_token_id else ids + [tokenizer.eos_token_id]


def sft_examples(dataset: datasets.Dataset) -> datasets.Dataset:
    """prompt/completion (text or messages) as they are, or `messages` split before its last assistant turn.

    TRL renders them: plain text as prompt + completion + eos, conversations with the chat template (prompt with
    the assistant turn opened, as PPO's prompts are)."""
    cols = set(dataset.column_names)
    if "messages" in cols:
        def split(ex):
            prompt, completion = split_messages(ex["messages"])
            return {"prompt": prompt, "completion": completion}
        return dataset.map(split, remove_columns=dataset.column_names, desc="SFT examples")
    if {"prompt", "completion"} <= cols:
        return dataset.select_columns(["prompt", "completion"])
    raise ConfigError(f"SFT data needs prompt/completion or messages columns; got {sorted(cols)}")


def preference_ids(dataset: datasets.Dataset, tokenizer) -> datasets.Dataset:
    """chosen/rejected (prompt optional; text or messages) -> chosen_ids/rejected_ids via `encode_example`."""
    cols = set(dataset.column_names)
    if not {"chosen", "rejected"} <= cols:
        raise ConfigError(f"preference data needs chosen and rejected columns (prompt optional); got {sorted(cols)}")
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


# ---- shared training plumbing -----------------------------------------------------------------------------------

def trainer_kwargs(cfg: RecipeConfig, stage, output_dir: str) -> dict:
    """TrainingArguments shared by both stages: our stage config, no network, no checkpoints, a progress bar."""
    device = resolve_device(cfg.model.device)
    dtype = compute_dtype(cfg.model.dtype, device)
    ckpt = {"on": True, "off": False}.get(cfg.memory.gradient_checkpointing, device.type == "cuda")
    return dict(output_dir=output_dir, num_train_epochs=stage.epochs, max_steps=stage.max_steps,
                learning_rate=stage.learning_rate, per_device_train_batch_size=stage.batch_size,
                gradient_accumulation_steps=stage.gradient_accumulation_steps, max_length=stage.max_length,
                bf16=device.type == "cuda" and dtype == torch.bfloat16, fp16=False, use_cpu=device.type == "cpu",
                activation_checkpointing=ckpt, activation_checkpointing_kwargs={"use_reentrant": False},
                seed=cfg.seed, data_seed=cfg.seed, report_to="none", save_strategy="no", eval_strategy="no",
                logging_steps=1, disable_tqdm=False, push_to_hub=False)


class LossBar(ProgressCallback):
    """The progress bar shows the latest loss (logged every step) instead of printing one line per log."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            shown = {k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "accuracy", "margin")}
            if shown:
                self.training_bar.set_postfix(shown, refresh=False)


def use_loss_bar(trainer) -> None:
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LossBar)


def trainable_to_compute_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Undo TRL's bf16 cast of LoRA and score weights on quantized models (see the module docstring). A no-op on
    CUDA (compute dtype bf16) and for an unquantized base, whose LoRA weights PEFT keeps in float32."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not (getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)):
        return
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)


def loss_summary(trainer, result) -> dict:
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"train_loss": float(result.training_loss),
            "train_loss_first": losses[0] if losses else float("nan"),
            "train_loss_last": losses[-1] if losses else float("nan"),
            "steps": int(result.global_step)}


@contextlib.contextmanager
def scratch_dir(run_dir: Path, stage: str):
    """TRL's output_dir: a temporary folder inside the run, removed afterwards (we save what we need ourselves)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f".{stage}-", dir=run_dir))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def check_run_dir(run_dir: Path, model_config, cfg: RecipeConfig) -> None:
    """Fail before training, not after, when the run directory holds adapters of another base."""
    path = run_dir / META_FILE
    if path.is_file():
        check_base(json.loads(path.read_text()), model_config, cfg.model.name, run_dir)


def update_run_metadata(run_dir: Path, model_config, cfg: RecipeConfig, role: str, head: str | None = None) -> dict:
    """Merge `role` (and `head`) into RUN/lowrank_rlhf.json, in RoleModel.metadata()'s format."""
    path = run_dir / META_FILE
    meta = json.loads(path.read_text()) if path.is_file() else {}
    if meta:
        check_base(meta, model_config, cfg.model.name, run_dir)
    roles = list(meta.get("roles", []))
    heads = list(meta.get("heads", []))
    roles += [role] if role not in roles else []
    heads += [head] if head and head not in heads else []
    meta.update(base=base_fingerprint(model_config, cfg.model.name), quantization=cfg.model.quantization,
                roles=roles, critic=meta.get("critic", cfg.lora.critic), heads=heads,
                lora={"r": cfg.lora.r, "alpha": cfg.lora.alpha, "target_modules": list(cfg.lora.target_modules)})
    path.write_text(json.dumps(meta, indent=2))
    return meta


def train_and_save(cfg: RecipeConfig, run_dir: Path, stage: str, make_trainer, save):
    """Build a TRL trainer on a scratch output_dir, refuse a run directory of another base before training, train,
    then save the stage's adapter with `save(trainer, cfg, run_dir)`. Returns (trainer, TrainOutput)."""
    with scratch_dir(run_dir, stage) as out:
        trainer = make_trainer(out)
        check_run_dir(run_dir, trainer.model.get_base_model().config, cfg)
        result = trainer.train()
        save(trainer, cfg, run_dir)
    return trainer, result


def free() -> None:
    """Return memory after the caller dropped its references (a trainer holds the model and optimizer)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- SFT --------------------------------------------------------------------------------------------------------

def sft_trainer(cfg: RecipeConfig, dataset: datasets.Dataset, output_dir: str | Path):
    """SFTTrainer with a fresh LoRA adapter on the shared quantized base; completion-only loss."""
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(cfg.seed)
    base, tokenizer = load_base(cfg.model)
    args = SFTConfig(**trainer_kwargs(cfg, cfg.sft, str(output_dir)), completion_only_loss=True)
    trainer = SFTTrainer(model=base, args=args, train_dataset=sft_examples(dataset),
                         processing_class=tokenizer, peft_config=peft_lora_config(cfg.lora))
    trainable_to_compute_dtype(trainer.model, compute_dtype(cfg.model.dtype, base.device))
    use_loss_bar(trainer)
    return trainer


def save_sft(trainer, cfg: RecipeConfig, run_dir: str | Path) -> Path:
    """The trained adapter -> RUN/sft (plain PEFT), and `sft` into RUN/lowrank_rlhf.json."""
    run_dir = Path(run_dir)
    # adapter "default" lands in the folder itself, not in a subfolder
    write_atomically(run_dir / "sft", lambda tmp: trainer.model.save_pretrained(str(tmp)), manifest=False)
    if (run_dir / "policy").is_dir():
        log.warning("%s/policy exists and does not start from the new sft adapter; delete it to restart PPO", run_dir)
    update_run_metadata(run_dir, trainer.model.get_base_model().config, cfg, "sft")
    return run_dir / "sft"


def train_sft(cfg: RecipeConfig, dataset: datasets.Dataset, run_dir: str | Path) -> dict:
    """Supervised fine-tuning of the `sft` adapter; writes RUN/sft. Returns loss, steps and seconds."""
    run_dir = Path(run_dir)
    start = time.perf_counter()
    trainer, result = train_and_save(cfg, run_dir, "sft", lambda out: sft_trainer(cfg, dataset, out), save_sft)
    metrics = {**loss_summary(trainer, result), "examples": len(trainer.train_dataset),
               "seconds": time.perf_counter() - start}
    del trainer
    free()
    return metrics


# ---- reward model -----------------------------------------------------------------------------------------------

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
    with suppress_seqcls_warning():
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


def reward_trainer(cfg: RecipeConfig, dataset: datasets.Dataset, output_dir: str | Path):
    """RewardTrainer (Bradley-Terry) with a fresh LoRA adapter + score head on the shared quantized base."""
    from trl import RewardConfig, RewardTrainer

    model, tokenizer = load_reward_base(cfg)
    pairs = within_length(preference_ids(dataset, tokenizer), cfg.reward_model.max_length)
    if len(pairs) == 0:
        raise ConfigError(f"reward_model.max_length: no preference pair fits in {cfg.reward_model.max_length} "
                          f"tokens; raise it or shorten the data")
    pad_id = pooling_pad_id(tokenizer, list(pairs["chosen_ids"]) + list(pairs["rejected_ids"]))
    args = RewardConfig(**trainer_kwargs(cfg, cfg.reward_model, str(output_dir)),
                        pad_token=tokenizer.convert_ids_to_tokens(pad_id))
    trainer = RewardTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer,
                            peft_config=reward_lora_config(cfg))
    # TRL 1.16 casts LoRA and the score head to bf16 on a quantized model even with bf16=False (DESIGN.md §3).
    trainable_to_compute_dtype(trainer.model, compute_dtype(cfg.model.dtype, model.device))
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

    write_atomically(run_dir / "reward", write, manifest=False)
    update_run_metadata(run_dir, model.get_base_model().config, cfg, "reward", head="reward")
    return run_dir / "reward"


def score_sequences(model: RoleModel, sequences: list[list[int]], batch_size: int = 16) -> torch.Tensor:
    """Rewards of token-id sequences through RoleModel.rewards (reward adapter + head), left-padded, no grad."""
    pad = model.tokenizer.pad_token_id or 0
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return model.rewards(ids.to(model.device), mask.to(model.device), micro_batch=batch_size).float().cpu()


def pairwise_accuracy(model: RoleModel, dataset: datasets.Dataset, max_length: int, batch_size: int = 16) -> float:
    """Share of pairs with r(chosen) > r(rejected), scored as PPO scores (ties count as wrong)."""
    pairs = within_length(preference_ids(dataset, model.tokenizer), max_length)
    if len(pairs) == 0:
        return float("nan")
    chosen = score_sequences(model, pairs["chosen_ids"], batch_size)
    rejected = score_sequences(model, pairs["rejected_ids"], batch_size)
    return (chosen > rejected).float().mean().item()


def evaluate_reward(cfg: RecipeConfig, run_dir: str | Path, dataset: datasets.Dataset) -> float:
    """Held-out accuracy of RUN/reward, loaded onto a fresh causal base exactly as PPO loads it."""
    base, tokenizer = load_base(cfg.model)
    model = RoleModel.load(base, tokenizer, run_dir, cfg.lora, base_name=cfg.model.name,
                           quantization=cfg.model.quantization, roles=("reward",), trainable=())
    accuracy = pairwise_accuracy(model, dataset, cfg.reward_model.max_length, 2 * cfg.reward_model.batch_size)
    del model, base
    free()
    return accuracy


def train_reward(cfg: RecipeConfig, dataset: datasets.Dataset, run_dir: str | Path,
                 eval_dataset: datasets.Dataset | None = None) -> dict:
    """Train the reward adapter + head; writes RUN/reward. eval_accuracy is measured through RoleModel."""
    run_dir = Path(run_dir)
    start = time.perf_counter()
    trainer, result = train_and_save(cfg, run_dir, "reward", lambda out: reward_trainer(cfg, dataset, out),
                                     save_reward)
    metrics = {**loss_summary(trainer, result), "pairs": len(trainer.train_dataset)}
    accuracies = [e["accuracy"] for e in trainer.state.log_history if "accuracy" in e]
    metrics["train_accuracy_last"] = accuracies[-1] if accuracies else float("nan")
    train_seconds = time.perf_counter() - start
    del trainer  # before a second base is loaded for the evaluation
    free()
    held_out = eval_dataset is not None and len(eval_dataset) > 0
    metrics["eval_accuracy"] = evaluate_reward(cfg, run_dir, eval_dataset) if held_out else None
    metrics["eval_pairs"] = len(eval_dataset) if held_out else 0
    metrics["train_seconds"] = train_seconds
    metrics["seconds"] = time.perf_counter() - start
    if metrics["eval_accuracy"] is not None and math.isnan(metrics["eval_accuracy"]):
        log.warning("no held-out pair fits reward_model.max_length; eval_accuracy is nan")
    return metrics
