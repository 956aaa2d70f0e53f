"""lowrank_rlhf: RLHF (SFT -> reward model -> online RL) for LLaMA-family models on one consumer GPU.

One 4-bit or 8-bit base is loaded once; LoRA adapters on it play every role (policy, value, reward, the frozen SFT
reference). The RL loop plans micro-batches to fit the card and recovers from out-of-memory errors.

The public names below are imported on first use (PEP 562 `__getattr__`), so `import lowrank_rlhf` and the CLI's
`--help` do not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
import logging
import warnings

__version__ = "0.1.0"


class _NoHubKernelNotice(logging.Filter):
    """Drops bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" warning.

    bitsandbytes 0.50 logs it at import on every CPU with AVX512-BF16 when the optional `kernels` package (which
    downloads a fused kernel from the Hugging Face Hub) is absent. That kernel serves only the repacked no-grad
    inference path of Linear4bit, which `loading.keep_one_cpu_4bit_path` switches off (PPO needs one kernel for
    grad and no-grad forwards), so it would never run here and nothing is slower without it. Other bitsandbytes
    warnings pass. Installed in the package's __init__, before any submodule imports transformers (which imports
    peft, then bitsandbytes)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoHubKernelNotice())
# transformers 5 renamed gradient checkpointing to activation checkpointing; our code uses the new names, but PEFT
# 0.21 (PeftModel.__init__) and TRL 1.16 still call the old ones, and every run printed their FutureWarnings, which
# no user can act on. Only these messages are silenced.
for _old in ("is_gradient_checkpointing", "gradient_checkpointing_disable", "gradient_checkpointing_enable"):
    warnings.filterwarnings("ignore", message=f"`{_old}` is deprecated", category=FutureWarning)


# public name -> the module that defines it
_PUBLIC = {
    "ConfigError": "config", "RecipeConfig": "config", "load_recipe": "config",
    "MemoryBudgetError": "memory.plan", "MemoryPlan": "memory.plan", "plan_recipe": "memory.plan",
    "ModelShape": "models.shapes",
    "build_smollm2": "models.builtin", "build_tiny_llama": "models.builtin",
    "load_base": "models.loading",
    "build_trainer": "pipeline", "load_roles": "pipeline", "run_stages": "pipeline",
    "BASE": "models.roles", "REFERENCE": "models.roles", "RoleModel": "models.roles",
    "Rollout": "rl.experience",
    "PPOTrainer": "rl.trainer", "RLTrainer": "rl.trainer", "RLConfig": "config",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'lowrank_rlhf' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
