"""The bench's flags, parsed and checked: every size of the workload is a flag."""

from __future__ import annotations

import argparse

from ..memory import PHASES

LAYOUTS = ("ours", "four-model", "ours-matched")
# tiny shapes built with random weights, for CPU smoke runs of the random-model path
RANDOM_TINY = "random-tiny"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The bench flags (cli.py wires them to `lowrank-rlhf bench`)."""
    parser.add_argument("--model", default=None,
                        help="llama2-7b | llama2-13b (published shapes, random weights, built in place) | "
                             f"{RANDOM_TINY} | tiny-llama | smollm2-135m | a local path or hub id; "
                             "default: llama2-7b on CUDA, tiny-llama on CPU")
    parser.add_argument("--quantization", default="4bit", choices=("4bit", "8bit", "none"),
                        help="how each base is stored (default 4bit, NF4 with bf16 compute on GPU)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="default: cuda if available")
    parser.add_argument("--batch", type=int, default=32, help="rollout batch: prompts per PPO step (default 32)")
    parser.add_argument("--prompt-len", type=int, default=256, help="tokens per prompt, exactly (default 256)")
    parser.add_argument("--response-len", type=int, default=256,
                        help="tokens per response, forced: no early EOS (default 256)")
    parser.add_argument("--steps", type=int, default=3, help="measured PPO steps after the warm-up (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="PPO steps run first and not measured (default 1)")
    parser.add_argument("--budget", default="24GiB",
                        help="memory budget shared by every layout, e.g. 24GiB; on CUDA enforced with "
                             "set_per_process_memory_fraction; 'auto' = free memory (default 24GiB)")
    parser.add_argument("--layouts", default="ours,four-model",
                        help=f"comma-separated, run in this order: {', '.join(LAYOUTS)} (default ours,four-model)")
    parser.add_argument("--micro-batch", default="",
                        help="skip the planner for these phases in every layout, e.g. generate=16,score=8,train=4")
    parser.add_argument("--decode", default="generate", choices=("generate", "static", "static-compiled"),
                        help="rollout decoding (ppo.decode): generate() with a growing cache, a static cache, or a "
                             "static cache with the step compiled as CUDA graphs (default generate)")
    parser.add_argument("--gradient-checkpointing", default="auto", choices=("auto", "on", "off"),
                        help="auto = as the planner decides (default)")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank of every adapter (default 16)")
    parser.add_argument("--ppo-epochs", type=int, default=4, help="PPO epochs per step (default 4, as TRL)")
    parser.add_argument("--mini-batches", type=int, default=1, help="minibatches per PPO epoch (default 1, as TRL)")
    parser.add_argument("--bandwidth", type=float, default=None,
                        help="GPU memory bandwidth in bytes/s for the weight-read floor, e.g. 3.35e12; default: "
                             "looked up from the device name")
    parser.add_argument("--force", action="store_true",
                        help="run a layout even when the planner says it does not fit the budget at micro-batch 1")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, prompts and sampling")
    parser.add_argument("--json", default="bench.json", help="where to write the JSON; .md and .png go beside it")
    parser.add_argument("--run-dir", default=None, help="where the trainers write metrics.jsonl (default: a temp dir)")
    return parser


def check_sizes(args: argparse.Namespace) -> None:
    """Exit with a one-line message when the workload's sizes cannot make a PPO step."""
    if args.batch < 1 or args.prompt_len < 1 or args.response_len < 1 or args.steps < 1 or args.warmup < 0:
        raise SystemExit("bench: --batch, --prompt-len, --response-len and --steps must be >= 1, --warmup >= 0")
    if args.mini_batches < 1 or args.batch % args.mini_batches:
        raise SystemExit(f"bench: --batch ({args.batch}) must be divisible by --mini-batches ({args.mini_batches})")


def parse_micro_batch(text: str) -> dict[str, int]:
    """'generate=16,score=8' -> {'generate': 16, 'score': 8}."""
    out: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in PHASES or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--micro-batch {text!r}: expected phase=N with phase in {', '.join(PHASES)} and N >= 1, "
                             f"e.g. generate=16,score=8,train=4")
        out[key.strip()] = int(value)
    return out


def parse_layouts(text: str) -> list[str]:
    layouts = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in layouts if x not in LAYOUTS]
    if bad or not layouts:
        raise ValueError(f"--layouts {text!r}: allowed layouts: {', '.join(LAYOUTS)}")
    return list(dict.fromkeys(layouts))
