"""The SFT, reward-model and DPO stages, through TRL, on the same quantized base that PPO uses.

    sft.py      train_sft(cfg, dataset, RUN)          SFTTrainer + LoRA            -> RUN/sft
    reward.py   train_reward(cfg, pairs, RUN, held)   RewardTrainer + LoRA + score -> RUN/reward (+ reward_head)
    dpo.py      train_dpo(cfg, pairs, RUN, held)      DPOTrainer, policy from RUN/sft, reference = a frozen copy
                                                      -> RUN/policy (where online RL writes it)
    common.py   what they share: TrainingArguments, the fix for TRL's bf16 cast, scratch dir, run metadata

Each writes or merges RUN/lowrank_rlhf.json, so `RoleModel.load(base, tok, RUN, ...)` rebuilds the roles afterwards.
Prompts and answers are encoded by data.chat, the one chat encoding PPO uses too.
"""

from .common import free, train_and_save, trainer_kwargs, update_run_metadata
from .dpo import dpo_examples, dpo_trainer, save_policy, train_dpo
from .reward import (
                     answer_dependence,
                     evaluate_reward,
                     pairwise_stats,
                     pooling_pad_id,
                     preference_ids,
                     reward_trainer,
                     save_reward,
                     score_sequences,
                     train_reward,
)
from .sft import save_sft, sft_examples, sft_trainer, train_sft

__all__ = [
    "answer_dependence", "dpo_examples", "dpo_trainer", "evaluate_reward", "free", "pairwise_stats",
    "pooling_pad_id", "preference_ids", "reward_trainer", "save_policy", "save_reward", "save_sft", "score_sequences",
    "sft_examples", "sft_trainer", "train_and_save", "train_dpo", "train_reward", "train_sft", "trainer_kwargs",
    "update_run_metadata",
]
