"""DPO (offline preference optimisation) with TRL's DPOTrainer, on the same quantized base the other stages use.

    train_dpo(cfg, pairs, RUN, held)   DPOTrainer: policy = RUN/sft (trainable), reference = a frozen copy of it
                                       -> RUN/policy (plain PEFT, where online RL writes it)
                                          + RUN/policy/dpo_metrics.json

The reference: handed a PeftModel whose "default" adapter is already trained, TRL 1.16's DPOTrainer adds an adapter
"ref" with the same config and copies "default"'s weights into it; its reference forward runs under
`use_adapter(model, "ref")`. So we load RUN/sft as "default" with is_trainable=True (PEFT's default False would leave
nothing to train) and let TRL make the reference: one base, two adapters, no hand-made copy.

Exactness at step 0 (the policy equals the reference, so DPO's implicit rewards beta * (log pi - log ref) are 0):
TRL casts every trainable parameter of a quantized model to bf16 (even with bf16=False, as in the other stages,
common.py) after it copied the reference, so the policy would start as a bf16-rounded sft and the reference as the
exact one. We cast the trainable LoRA weights back to float32 (the dtype PEFT gives the loaded reference, on CPU and
GPU alike: both adapters then run the same path) and copy the reference's exact weights back into the policy.

Data: prompt/chosen/rejected (text or messages). We tokenize the pairs ourselves with data.chat, exactly as a
rollout lays them out (prompt ids as PPO encodes them, then the answer ending with eos), and hand TRL prompt_ids /
chosen_ids / rejected_ids. TRL re-tokenizes every dataset it is given (rendering prompt + answer as one string, so a
template's text after the end-of-turn token is trained), which `PretokenizedDPOTrainer` skips.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import datasets
import peft
import torch

from ..config import ConfigError, RecipeConfig
from ..data import DataError, encode_example_parts
from ..models.loading import load_base
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
POLICY, REF = "default", "ref"  # TRL's names for the trained adapter and its frozen copy
METRICS_FILE = "dpo_metrics.json"
# TRL's per-step metrics kept in the stage summary (first and last logged value of each)
REPORTED = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def dpo_examples(dataset: datasets.Dataset, tokenizer, max_length: int) -> datasets.Dataset:
    """prompt/chosen/rejected -> prompt_ids/chosen_ids/rejected_ids in the rollout's layout; pairs longer than
    max_length (prompt + the longer answer) are skipped with a warning, as the reward stage does."""
    cols = set(dataset.column_names)
    if not {"chosen", "rejected"} <= cols:
        raise DataError(f"data.preferences: DPO needs chosen and rejected columns (prompt optional); "
                        f"got {sorted(cols)}")

    def encode(ex):
        prompt = ex.get("prompt") or ""
        prompt_ids, chosen = encode_example_parts(tokenizer, prompt, ex["chosen"])
        rejected_prompt, rejected = encode_example_parts(tokenizer, prompt, ex["rejected"])
        if rejected_prompt != prompt_ids:  # an implicit prompt (conversation in chosen/rejected) must be shared
            raise DataError("data.preferences: chosen and rejected of one pair start from different prompts")
        return {"prompt_ids": prompt_ids, "chosen_ids": chosen, "rejected_ids": rejected}
    encoded = dataset.map(encode, remove_columns=dataset.column_names, desc="tokenizing DPO pairs")
    kept = encoded.filter(lambda ex: len(ex["prompt_ids"]) + max(len(ex["chosen_ids"]), len(ex["rejected_ids"]))
                          <= max_length)
    if len(kept) < len(encoded):
        log.warning("%d of %d preference pairs are longer than dpo.max_length=%d tokens and are skipped",
                    len(encoded) - len(kept), len(encoded), max_length)
    if len(kept) == 0:
        raise ConfigError(f"dpo.max_length: no preference pair fits in {max_length} tokens; raise it or shorten "
                          f"the data")
    return kept


def _trainer_class():
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer on pairs tokenized by `dpo_examples`: TRL 1.16 has no switch to skip its own tokenization."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset
    return PretokenizedDPOTrainer


def load_policy_from_sft(cfg: RecipeConfig, run_dir: Path):
    """The shared quantized base with RUN/sft loaded as TRL's trainable "default" adapter."""
    source = run_dir / "sft"
    if not (source / "adapter_config.json").is_file():
        raise ConfigError(f"dpo: {source} holds no SFT adapter (the DPO policy starts from it and the reference is "
                          f"a frozen copy); run --stage sft first, or train with dpo.enabled=true")
    verify_adapter(source)
    base, tokenizer = load_base(cfg.model)
    model = peft.PeftModel.from_pretrained(base, str(source), adapter_name=POLICY, is_trainable=True)
    return model, tokenizer


def dpo_trainer(cfg: RecipeConfig, dataset: datasets.Dataset, output_dir: str | Path, run_dir: str | Path,
                eval_dataset: datasets.Dataset | None = None):
    """TRL's DPOTrainer: policy = RUN/sft (trainable), reference = TRL's frozen "ref" copy of it (module docstring)."""
    from trl import DPOConfig

    torch.manual_seed(cfg.seed)
    model, tokenizer = load_policy_from_sft(cfg, Path(run_dir))
    stage = cfg.dpo
    args = DPOConfig(**trainer_kwargs(cfg, stage, str(output_dir)), beta=stage.beta, loss_type=[stage.loss_type],
                     per_device_eval_batch_size=stage.batch_size)
    pairs = dpo_examples(dataset, tokenizer, stage.max_length)
    held = dpo_examples(eval_dataset, tokenizer, stage.max_length) if eval_dataset is not None and len(
        eval_dataset) else None
    trainer = _trainer_class()(model=model, args=args, train_dataset=pairs, eval_dataset=held,
                               processing_class=tokenizer)
    if REF not in trainer.model.peft_config:  # TRL skips the copy for target_parameters configs on old PEFT
        raise RuntimeError("TRL's DPOTrainer made no 'ref' adapter: the reference would be the base, not sft")
    # TRL rounded the policy to bf16 after copying the reference (module docstring): float32, then sft's exact weights
    trainable_to_compute_dtype(trainer.model, torch.float32)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if f".{POLICY}." in name:
                param.copy_(trainer.model.get_parameter(name.replace(f".{POLICY}.", f".{REF}.")))
    use_loss_bar(trainer)
    return trainer


def save_policy(trainer, cfg: RecipeConfig, run_dir: str | Path) -> Path:
    """The trained adapter ("default", never the reference) -> RUN/policy (plain PEFT), as online RL saves it."""
    run_dir = Path(run_dir)
    write_atomically(run_dir / "policy",
                     lambda tmp: trainer.model.save_pretrained(str(tmp), selected_adapters=[POLICY]))
    update_run_metadata(run_dir, trainer.model.get_base_model().config, cfg, "policy")
    return run_dir / "policy"


def dpo_summary(trainer) -> dict:
    """First and last logged value of TRL's reward metrics (the first is measured before any update: 0 exactly)."""
    out = {}
    for key in REPORTED:
        values = [e[key] for e in trainer.state.log_history if key in e]  # eval entries say eval_rewards/...
        if values:
            out[f"{key}_first"], out[f"{key}_last"] = values[0], values[-1]
    return out


def train_dpo(cfg: RecipeConfig, dataset: datasets.Dataset, run_dir: str | Path,
              eval_dataset: datasets.Dataset | None = None) -> dict:
    """DPO from RUN/sft; writes RUN/policy and RUN/policy/dpo_metrics.json. Returns losses, TRL's reward metrics
    (rewards/chosen, rewards/margins, rewards/accuracies...) and, on held-out pairs, TRL's evaluation of them."""
    run_dir = Path(run_dir)
    start = time.perf_counter()
    trainer, result = train_and_save(cfg, run_dir, "dpo",
                                     lambda out: dpo_trainer(cfg, dataset, out, run_dir, eval_dataset), save_policy)
    metrics = {**loss_summary(trainer, result), **dpo_summary(trainer), "pairs": len(trainer.train_dataset),
               "beta": cfg.dpo.beta, "loss_type": cfg.dpo.loss_type}
    if trainer.eval_dataset is not None:
        evaluation = trainer.evaluate()
        metrics["eval"] = {k[len("eval_"):]: v for k, v in evaluation.items()
                           if k.startswith("eval_rewards/") or k == "eval_loss"}
        metrics["eval_pairs"] = len(trainer.eval_dataset)
    metrics["seconds"] = time.perf_counter() - start
    (run_dir / "policy" / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    del trainer
    free()
    return metrics
