"""`lowrank-rlhf bench`: memory and speed of RL on one base: PPO against the four-model layout, and GRPO against
TRL's own GRPOTrainer (`--algorithm grpo --layouts ours,trl-grpo`).

The same command measures a CPU run with tiny-llama or SmolLM2 and a GPU run with a published shape (LLaMA-1/2
7B-70B, Llama-3.1-8B, Qwen3-8B: the short names of models/shapes.py's table); every size is a flag (args.py). Those
shapes are built with random weights directly in 4-bit on the GPU (models/random_llama.py):
memory and speed do not depend on the weights' values.

Workload (workload.py): `--batch` prompts of exactly `--prompt-len` random token ids, responses of exactly
`--response-len` tokens (no early EOS), `--warmup` PPO steps, then `--steps` measured ones. The scorer is the learned
reward head.

Algorithms: `--algorithm ppo|grpo|rloo|reinforce_pp` runs our loop with that ppo.algorithm; the critic-free ones load
the policy adapter alone (reference = adapter disabled) and score with a Python reward function (`--reward`) on text
prompts of exactly `--prompt-len` tokens.

Layouts (layouts.py, four_model.py, trl_grpo.py), one after another, under the same memory budget (on CUDA
enforced with set_per_process_memory_fraction), each with the micro-batches the planner picks for it: ours,
four-model (TRL's PPO layout), ours-matched (ours at the four-model layout's micro-batches), trl-grpo (TRL's
GRPOTrainer on the same base, prompts and reward function). On CPU each layout runs in its own process (child.py,
`--isolate`), so its peak RSS is its own.

Measuring (measure.py): the trainer's own phase clock (rl/timing.py) gives each phase's time and peak memory; the
bench times the whole step and watches generation.

Output (report.py): a JSON (--json), a markdown table (.md) and a plot (.png) next to it. Per layout: peak memory per
phase (allocated and reserved), step time, generation / scoring / training tokens per second, the planner's predicted
peak against the measured one, decode milliseconds per token step against the weight-read floor (weight bytes /
memory bandwidth), peak RSS, median step time; then the ratios ours / four-model and ours / trl-grpo and pass/fail
against the targets.
"""

import importlib

from .args import LAYOUTS, add_arguments, parse_layouts, parse_micro_batch

# imported on first use: the CLI reads the bench's flags (args.py) without importing torch for `--help`
_LAZY = {"main": "command", "run": "command", "run_bench": "command", "LAYOUT_KEYS": "measure"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)


__all__ = ["LAYOUTS", "LAYOUT_KEYS", "add_arguments", "main", "parse_layouts", "parse_micro_batch", "run",
           "run_bench"]
