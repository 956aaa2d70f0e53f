"""The SFT and reward-model stages, through TRL, on the same quantized base that PPO uses.

    sft.py      train_sft(cfg, dataset, RUN)          SFTTrainer + LoRA            -> RUN/sft
    reward.py   train_reward(cfg, pairs, RUN, held)   RewardTrainer + LoRA + score -> RUN/reward (+ reward_head)
    common.py   what both share: TrainingArguments, the fix for TRL's bf16 cast, scratch dir, run metadata

Both write or merge RUN/lowrank_rlhf.json, so `RoleModel.load(base, tok, RUN, ...)` rebuilds the roles afterwards.
Prompts and answers are encoded by data.chat, the one chat encoding PPO uses too.
"""

from .common import free, train_and_save, trainer_kwargs, update_run_metadata
from .reward import (answer_dependence, evaluate_reward, pairwise_stats, pooling_pad_id, preference_ids,
                     reward_trainer, save_reward, score_sequences, train_reward)
from .sft import save_sft, sft_examples, sft_trainer, train_sft

__all__ = [
    "answer_dependence", "evaluate_reward", "free", "pairwise_stats", "pooling_pad_id", "preference_ids",
    "reward_trainer", "save_reward", "save_sft", "score_sequences", "sft_examples", "sft_trainer", "train_and_save", "train_reward",
    "train_sft", "trainer_kwargs", "update_run_metadata",
]
