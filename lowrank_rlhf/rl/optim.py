"""What training the roles needs: their optimizer (`ppo.optim`): torch's AdamW, or bitsandbytes' AdamW with 8-bit
states; and dropout off.

The 8-bit states (bitsandbytes' block-wise quantized moments) take a quarter of fp32 AdamW's memory; the paged one
also lets the states move to CPU memory when the GPU runs short (on CPU bitsandbytes falls back to non-paged).
bitsandbytes keeps tensors under `min_8bit_size` (4096) elements in 32-bit states: small heads and tiny test
adapters stay fp32, real LoRA matrices (r x hidden) do not. All three take the same parameter groups, learning
rates, eps and weight decay, and save and load through `state_dict()`, so checkpoints and exact resume work alike.
"""

from __future__ import annotations

import logging

import torch
from trl.trainer.utils import disable_dropout_in_model

from ..config import ConfigError, PPOConfig

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
EPS = 1e-5  # TRL's PPO eps


def build_optimizer(groups: list[dict], ppo: PPOConfig) -> torch.optim.Optimizer:
    """`groups`: torch param groups, each with its own "lr"."""
    if ppo.optim == "adamw":
        return torch.optim.AdamW(groups, eps=EPS, weight_decay=ppo.weight_decay)
    if ppo.optim not in OPTIMIZERS:
        raise ConfigError(f"ppo.optim: unknown optimizer {ppo.optim!r}; allowed: {', '.join(OPTIMIZERS)}")
    try:
        import bitsandbytes as bnb
    except ImportError as err:  # e.g. a platform without a bitsandbytes build
        raise ConfigError(f"ppo.optim={ppo.optim} needs bitsandbytes, which does not import here ({err}); use "
                          f"ppo.optim=adamw (allowed: {', '.join(OPTIMIZERS)})") from err
    cls = bnb.optim.AdamW8bit if ppo.optim == "adamw_8bit" else bnb.optim.PagedAdamW8bit
    return cls(groups, eps=EPS, weight_decay=ppo.weight_decay)


def turn_off_dropout(model: torch.nn.Module) -> None:
    """No dropout in RL (TRL's PPO default, `disable_dropout`). With it, the old, reference and new logprobs of one
    token would come from different random masks: KL is not 0 at step 0 and the ratio is noise. Adapters may carry
    a dropout the recipe does not show (a loaded SFT adapter's own adapter_config), so every module is checked."""
    rates = sorted({m.p for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0})
    if rates:
        log.warning("dropout %s turned off for the RL stage: it would make the old, reference and new logprobs of a "
                    "token disagree (lora.dropout applies to SFT, reward and DPO only)", ", ".join(map(str, rates)))
    disable_dropout_in_model(model)
