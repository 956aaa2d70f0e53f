"""`lowrank-rlhf bench`: memory and speed of PPO, our one-base layout against the four-model layout.

The same command measures a CPU run with tiny-llama or SmolLM2 and a GPU run with LLaMA-2-7B/13B; every size is a
flag (args.py). LLaMA-2 shapes are built with random weights directly in 4-bit on the GPU (models/random_llama.py):
memory and speed do not depend on the weights' values.

Workload (workload.py): `--batch` prompts of exactly `--prompt-len` random token ids, responses of exactly
`--response-len` tokens (no early EOS), `--warmup` PPO steps, then `--steps` measured ones. The scorer is the learned
reward head.

Layouts (layouts.py, four_model.py), in one process, one after another, under the same memory budget (on CUDA
enforced with set_per_process_memory_fraction), each with the micro-batches the planner picks for it: ours,
four-model (TRL's), ours-matched (ours at the four-model layout's micro-batches).

Measuring (measure.py): the trainer's own phase clock (rl/timing.py) gives each phase's time and peak memory; the
bench times the whole step and watches generation.

Output (report.py): a JSON (--json), a markdown table (.md) and a plot (.png) next to it. Per layout: peak memory per
phase (allocated and reserved), step time, generation / scoring / training tokens per second, the planner's predicted
peak against the measured one, decode milliseconds per token step against the weight-read floor (weight bytes /
memory bandwidth); then the ratios ours / four-model and pass/fail against the targets.
"""

from .args import LAYOUTS, add_arguments, parse_layouts, parse_micro_batch
from .main import main, run, run_bench
from .measure import LAYOUT_KEYS

__all__ = ["LAYOUTS", "LAYOUT_KEYS", "add_arguments", "main", "parse_layouts", "parse_micro_batch", "run",
           "run_bench"]
