"""The bench's flags, parsed and checked: every size of the workload is a flag."""

from __future__ import annotations

import argparse

from ..config import ConfigError
from ..memory import PHASES
from ..models.shapes import SHORT_NAMES as RANDOM_MODELS

LAYOUTS = ("ours", "four-model", "ours-matched", "trl-grpo")
# the layouts that are PPO's (a critic and a reward model); the critic-free algorithms run ours and trl-grpo
PPO_LAYOUTS = ("four-model", "ours-matched")
ALGORITHMS = ("ppo", "grpo", "rloo", "reinforce_pp")
DEFAULT_REWARD = "lowrank_rlhf.rewards:brevity"
# tiny shapes built with random weights, for CPU smoke runs of the random-model path
RANDOM_TINY = "random-tiny"


class BenchArgumentError(ConfigError):
    """A flag that cannot make a workload: the CLI prints its one line and exits 2, before anything runs."""


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The bench flags (cli.py wires them to `lowrank-rlhf bench`)."""
    parser.add_argument("--model", default=None,
                        help=f"{' | '.join(RANDOM_MODELS)} (published shapes from the planner's table, random "
                             f"weights, built in place) | {RANDOM_TINY} | tiny-llama | smollm2-135m | a local path or "
                             "hub id; default: llama2-7b on CUDA, tiny-llama on CPU")
    parser.add_argument("--quantization", default="4bit", choices=("4bit", "8bit", "none"),
                        help="how each base is stored (default 4bit, NF4 with bf16 compute on GPU)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="default: cuda if available")
    parser.add_argument("--algorithm", default="ppo", choices=ALGORITHMS,
                        help="our loop's algorithm (ppo.algorithm, default ppo). ppo scores with the learned reward "
                             "head; grpo, rloo and reinforce_pp load no critic and score with --reward")
    parser.add_argument("--num-generations", type=int, default=None,
                        help="responses per prompt (ppo.num_generations); default 1 for ppo, 4 otherwise")
    parser.add_argument("--beta", type=float, default=0.04,
                        help="KL coefficient of grpo/rloo/reinforce_pp and of trl-grpo (default 0.04)")
    parser.add_argument("--reward", default=DEFAULT_REWARD,
                        help="the Python reward function (module:function or file.py:function, TRL's signature) "
                             f"of the critic-free algorithms and of trl-grpo (default {DEFAULT_REWARD})")
    parser.add_argument("--batch", type=int, default=32,
                        help="prompts per step (default 32); each gets --num-generations responses")
    parser.add_argument("--prompt-len", type=int, default=256, help="tokens per prompt, exactly (default 256)")
    parser.add_argument("--response-len", type=int, default=256,
                        help="tokens per response, forced: no early EOS (default 256)")
    parser.add_argument("--steps", type=int, default=3, help="measured PPO steps after the warm-up (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="PPO steps run first and not measured (default 1)")
    parser.add_argument("--budget", default="24GiB",
                        help="memory budget shared by every layout, e.g. 24GiB; on CUDA enforced with "
                             "set_per_process_memory_fraction; 'auto' = free memory (default 24GiB)")
    parser.add_argument("--layouts", default=None,
                        help=f"comma-separated, run in this order: {', '.join(LAYOUTS)} (default ours,four-model for "
                             "ppo, ours for the critic-free algorithms)")
    parser.add_argument("--micro-batch", default="",
                        help="skip the planner for these phases in every layout, e.g. generate=16,score=8,train=4")
    parser.add_argument("--decode", default="generate", choices=("generate", "static", "static-compiled"),
                        help="rollout decoding (ppo.decode): generate() with a growing cache, a static cache, or a "
                             "static cache with the step compiled as CUDA graphs (default generate)")
    parser.add_argument("--logits-chunk-tokens", type=int, default=0,
                        help="ours: lm_head + log-softmax for this many response tokens at a time "
                             "(ppo.logits_chunk_tokens; default 0 = the whole micro-batch at once)")
    parser.add_argument("--gradient-checkpointing", default="auto", choices=("auto", "on", "off"),
                        help="auto = as the planner decides (default)")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank of every adapter (default 16)")
    parser.add_argument("--ppo-epochs", type=int, default=None,
                        help="epochs over each rollout batch; default 4 for ppo (as TRL's PPO), 1 otherwise (TRL's "
                             "GRPO num_iterations)")
    parser.add_argument("--mini-batches", type=int, default=1, help="minibatches per PPO epoch (default 1, as TRL)")
    parser.add_argument("--bandwidth", type=float, default=None,
                        help="GPU memory bandwidth in bytes/s for the weight-read floor, e.g. 3.35e12; default: "
                             "looked up from the device name")
    parser.add_argument("--force", action="store_true",
                        help="run a layout even when the planner says it does not fit the budget at micro-batch 1")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, prompts and sampling")
    parser.add_argument("--isolate", default="auto", choices=("auto", "on", "off"),
                        help="run each layout in its own process, so its peak RSS is its own: auto = on for CPU runs "
                             "of more than one layout (default auto)")
    parser.add_argument("--json", default="bench.json", help="where to write the JSON; .md and .png go beside it")
    parser.add_argument("--run-dir", default=None, help="where the trainers write metrics.jsonl (default: a temp dir)")
    parser.add_argument("recipe", nargs="?", default=None,
                        help="optional: take the workload from a recipe (model, quantization, LoRA rank, budget, "
                             "algorithm, batch, lengths, epochs) as train and plan do; key=value overrides apply to "
                             "it; a flag given on the command line wins")
    parser.set_defaults(overrides=[])
    parser.set_defaults(flag_defaults=vars(parser.parse_args([])))  # what each flag is when not given
    return parser


# bench flag -> how a recipe gives it
def _bench_model(name: str) -> str:
    """A recipe's hub id of a published shape -> the short name the bench builds with random weights."""
    from ..models.shapes import KNOWN_SHAPES

    shape = KNOWN_SHAPES.get(name)
    return next((k for k in RANDOM_MODELS if KNOWN_SHAPES[k] is shape), name) if shape is not None else name


FROM_RECIPE = {
    "model": lambda c: _bench_model(c.model.name), "quantization": lambda c: c.model.quantization,
    "algorithm": lambda c: c.ppo.algorithm, "num_generations": lambda c: c.ppo.num_generations,
    "beta": lambda c: c.ppo.beta, "batch": lambda c: c.ppo.rollout_batch_size // c.ppo.num_generations,
    "prompt_len": lambda c: c.data.max_prompt_length, "response_len": lambda c: c.ppo.response_length,
    "budget": lambda c: c.memory.budget, "decode": lambda c: c.ppo.decode,
    "logits_chunk_tokens": lambda c: c.ppo.logits_chunk_tokens, "lora_r": lambda c: c.lora.r,
    "gradient_checkpointing": lambda c: c.memory.gradient_checkpointing, "ppo_epochs": lambda c: c.ppo.num_ppo_epochs,
    "mini_batches": lambda c: c.ppo.num_mini_batches, "seed": lambda c: c.seed,
}


def apply_recipe(args: argparse.Namespace) -> None:
    """`bench RECIPE [key=value ...]`: every flag left at its default takes the recipe's value."""
    from ..config import load_recipe

    if getattr(args, "recipe", None) is None:
        if getattr(args, "overrides", None):
            raise BenchArgumentError(f"bench: key=value overrides ({args.overrides[0]}) need a recipe to apply to")
        return
    cfg = load_recipe(args.recipe, args.overrides)
    defaults = getattr(args, "flag_defaults", {})
    for flag, read in FROM_RECIPE.items():
        if getattr(args, flag) == defaults.get(flag):
            setattr(args, flag, read(cfg))


def resolve_defaults(args: argparse.Namespace) -> None:
    """Fill the defaults that depend on --algorithm (TRL's for each algorithm)."""
    critic_free = args.algorithm != "ppo"
    if args.num_generations is None:
        args.num_generations = 4 if critic_free else 1
    if args.ppo_epochs is None:
        args.ppo_epochs = 1 if critic_free else 4
    if args.layouts is None:  # the four-model layouts are PPO's; name trl-grpo to compare with TRL
        args.layouts = "ours" if critic_free else "ours,four-model"


def check_sizes(args: argparse.Namespace) -> None:
    """A one-line BenchArgumentError when the workload's sizes, micro-batches or layouts cannot make a step."""
    apply_recipe(args)
    resolve_defaults(args)
    parse_micro_batch(args.micro_batch)
    if args.num_generations < 1 or args.ppo_epochs < 1:
        raise BenchArgumentError("bench: --num-generations and --ppo-epochs must be >= 1")
    if args.algorithm in ("grpo", "rloo") and args.num_generations < 2:
        raise BenchArgumentError(f"bench: --algorithm {args.algorithm} needs --num-generations >= 2 (the other "
                                 f"samples of a prompt are the baseline)")
    layouts = parse_layouts(args.layouts)
    ppo_only = [x for x in layouts if x in PPO_LAYOUTS]
    if args.algorithm != "ppo" and ppo_only:
        raise BenchArgumentError(f"bench: layouts {', '.join(ppo_only)} are PPO's (critic and reward model); with "
                                 f"--algorithm {args.algorithm} use: ours, trl-grpo")
    if "trl-grpo" in layouts and (args.algorithm != "grpo" or args.ppo_epochs != 1 or args.mini_batches != 1):
        raise BenchArgumentError("bench: layout trl-grpo compares TRL's GRPOTrainer step for step: it needs "
                                 f"--algorithm grpo, --ppo-epochs 1 and --mini-batches 1 (got {args.algorithm}, "
                                 f"{args.ppo_epochs}, {args.mini_batches})")
    if args.logits_chunk_tokens < 0:
        raise BenchArgumentError(f"bench: --logits-chunk-tokens must be >= 0 (0 = no chunks), got "
                                 f"{args.logits_chunk_tokens}")
    if args.batch < 1 or args.prompt_len < 1 or args.response_len < 1 or args.steps < 1 or args.warmup < 0:
        raise BenchArgumentError("bench: --batch, --prompt-len, --response-len and --steps must be >= 1, --warmup >= 0")
    rows = args.batch * args.num_generations
    if args.mini_batches < 1 or rows % args.mini_batches:
        raise BenchArgumentError(f"bench: --batch x --num-generations ({rows}) must be divisible by "
                                 f"--mini-batches ({args.mini_batches})")


def parse_micro_batch(text: str) -> dict[str, int]:
    """'generate=16,score=8' -> {'generate': 16, 'score': 8}."""
    out: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in PHASES or not value.strip().isdigit() or int(value) < 1:
            raise BenchArgumentError(f"--micro-batch {text!r}: expected phase=N with phase in {', '.join(PHASES)} "
                                     f"and N >= 1, e.g. generate=16,score=8,train=4")
        out[key.strip()] = int(value)
    return out


def parse_layouts(text: str) -> list[str]:
    layouts = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in layouts if x not in LAYOUTS]
    if bad or not layouts:
        raise BenchArgumentError(f"--layouts {text!r}: allowed layouts: {', '.join(LAYOUTS)}")
    return list(dict.fromkeys(layouts))
