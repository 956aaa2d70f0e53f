"""lowrank_rlhf: RLHF (SFT -> reward model -> PPO) for LLaMA-family models on one consumer GPU.

One 4-bit or 8-bit base is loaded once; LoRA adapters on it play every role (policy, value, reward, the frozen SFT
reference). The PPO loop plans micro-batches to fit the card and recovers from out-of-memory errors.
"""

from .config import ConfigError, RecipeConfig, load_recipe
from .memory.plan import MemoryBudgetError, MemoryPlan
from .memory.shapes import ModelShape
from .models.builtin import build_smollm2, build_tiny_llama
from .models.loading import load_base
from .pipeline import build_trainer, load_roles, run_stages
from .memory.plan import plan_recipe
from .models.roles import BASE, REFERENCE, RoleModel
from .rl.experience import Rollout
from .rl.trainer import PPOTrainer

__version__ = "0.1.0"

__all__ = [
    "BASE", "REFERENCE", "ConfigError", "MemoryBudgetError", "MemoryPlan", "ModelShape", "PPOTrainer",
    "RecipeConfig", "RoleModel", "Rollout", "build_smollm2", "build_tiny_llama", "build_trainer", "load_base",
    "load_recipe", "load_roles", "plan_recipe", "run_stages",
]
