"""`lowrank-rlhf` (also `python -m lowrank_rlhf`): quickstart, train, plan, generate, eval, compare, export, bench.

User errors (a bad recipe key, a missing file, a budget below the floor...) print one line and exit with code 2;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from .run.signals import Interrupted, raise_interrupted

# commands/evaluation.py TASKS' names, spelled here so that --help imports no torch (tests/test_cli.py holds them equal)
TASK_NAMES = ("clickbait", "text2sql", "text2sql_shapes")


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that a user's input causes and one line explains; anything else is a bug and keeps its traceback."""
    from .config import ConfigError
    from .data import DataError
    from .memory.plan import MemoryBudgetError
    from .models.runner import MicroBatchOOMError
    from .rewards import RewardFunctionError
    from .rl.trainer import NonFiniteError
    from .run.checkpoint import CheckpointError
    from .run.directory import RunDirError
    from .run.metadata import BaseMismatchError

    return (ConfigError, DataError, RewardFunctionError, MemoryBudgetError, MicroBatchOOMError, BaseMismatchError,
            RunDirError, CheckpointError, NonFiniteError, OSError)  # OSError: a full disk, a missing file


def cmd_quickstart(args) -> int:
    from .commands.quickstart import run_quickstart

    run_quickstart(output_dir=Path(args.output_dir), smoke=args.smoke, overwrite=args.overwrite,
                   algorithm=args.algorithm)
    return 0


def cmd_train(args) -> int:
    from .config import load_recipe
    from .pipeline import run_stages, stages_for

    cfg = load_recipe(args.recipe, args.overrides)
    stages = stages_for(cfg, args.stage)
    results = run_stages(cfg, stages, Path(args.output_dir) if args.output_dir else None, overwrite=args.overwrite)
    summary = {k: v for k, v in results.items() if k != "ppo"}
    if "ppo" in stages:
        summary["ppo_steps"] = results.get("ppo", {}).get("steps")
    print(json.dumps(summary, default=str, indent=1))
    close_process_group()
    return 0


def close_process_group() -> None:
    """Under torchrun the trainer's accelerate state opened a process group; the command owns the process, so it
    closes the group once every rank is done (a rank exiting with gloo's threads alive aborted once in CI)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def cmd_plan(args) -> int:
    from .config import load_recipe
    from .memory.plan import plan_recipe

    cfg = load_recipe(args.recipe, args.overrides)
    memory_plan = plan_recipe(cfg, budget=args.budget)
    if args.json:
        print(json.dumps(memory_plan.to_dict(), indent=1))
    else:
        print(f"{args.recipe}: {cfg.model.name} ({cfg.model.quantization}), LoRA r={cfg.lora.r}, "
              f"prompt {cfg.data.max_prompt_length} + response {cfg.ppo.response_length}, "
              f"rollout batch {cfg.ppo.rollout_batch_size}")
        print(memory_plan.table())
        if cfg.memory.micro_batch:  # the run takes these instead of the planner's micro-batches (plan.micro_batches)
            fixed = ", ".join(f"{phase}={n}" for phase, n in cfg.memory.micro_batch.items())
            print(f"memory.micro_batch fixes {fixed}: the run uses it instead of the planner's micro-batch there")
        print("fits" if memory_plan.fits else "does NOT fit: lower the batch or the lengths, or raise the budget")
    return 0 if memory_plan.fits else 1


def cmd_generate(args) -> int:
    from .commands.inference import generate_from_run

    for text in generate_from_run(Path(args.run), args.prompt, role=args.role, max_new_tokens=args.max_new_tokens,
                                  truncate=args.truncate):
        print(text)
    return 0


def cmd_export(args) -> int:
    from .commands.export import export_run

    out = export_run(Path(args.run), Path(args.out), merge=args.merge or bool(args.merge_into),
                     overwrite=args.overwrite, merge_into=args.merge_into or "dequantized", fmt=args.format,
                     quant=args.quant)
    print(f"exported to {out}")
    if args.format == "gguf":
        print(f"Ollama: cd {out} && ollama create my-policy -f Modelfile   (llama.cpp: llama-cli -m {out}/model.gguf)")
    return 0


def cmd_eval(args) -> int:
    from .commands.evaluation import evaluate_task

    evaluate_task(Path(args.run), args.task, args.held_out, args.reward, args.max_samples, args.max_new_tokens)
    return 0


def cmd_compare(args) -> int:
    from .commands.compare import compare_runs, train_seeds

    runs = [Path(r) for r in args.runs]
    if args.train_from:
        if not (args.recipe and args.seeds):
            raise_config_error("compare --train-from needs --recipe and --seeds")
        runs += train_seeds(Path(args.train_from), args.recipe, args.set or [], args.seeds, Path(args.out))
    task = None if args.held_out else args.task
    compare_runs(runs, Path(args.out), task, args.held_out, args.reward, policy=args.policy)
    return 0


def raise_config_error(message: str) -> None:
    from .config import ConfigError

    raise ConfigError(message)


def cmd_serve(args) -> int:
    from .serve import serve

    compare = tuple(args.compare.split(",")) if args.compare != "none" else None
    if compare is not None and len(compare) != 2:
        raise_config_error(f"--compare: expected two models such as sft,policy, got {args.compare!r}")
    serve(Path(args.run), host=args.host, port=args.port, api_key=args.api_key, max_tokens=args.max_tokens,
          feedback=compare)
    return 0


def cmd_verify(args) -> int:
    from .commands.verify import print_report, verify_run

    return print_report(Path(args.run), verify_run(Path(args.run), seal_unsealed=args.seal))


def cmd_config(args) -> int:
    from .commands.config_reference import reference, write_reference

    if args.out:
        print(f"wrote {write_reference(Path(args.out))}")
    else:
        print(reference(), end="")
    return 0


def cmd_bench(args) -> int:
    from . import bench

    return bench.run(args)


def recipe_command(sub, name: str, help_text: str, func) -> argparse.ArgumentParser:
    """A subcommand taking a recipe file and key=value overrides (options are added by the caller)."""
    p = sub.add_parser(name, help=help_text)
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. ppo.kl_coef=0.1")
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowrank-rlhf", description="RLHF (SFT -> reward model -> PPO) for "
                                     "LLaMA-family models on one GPU: one quantized base, LoRA adapters for every "
                                     "role.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("quickstart", help="all three stages on the embedded SmolLM2-135M (the clickbait test)")
    p.add_argument("--algorithm", default="ppo", choices=("ppo", "grpo", "rloo", "reinforce_pp", "dpo"),
                   help="the last stage: online RL with ppo (default), grpo, rloo or reinforce_pp after the reward "
                   "model; or dpo (sft -> DPO on the preference pairs, no reward model)")
    p.add_argument("--smoke", action="store_true", help="the same path in about two minutes (for CI)")
    p.add_argument("--output-dir", default="runs/quickstart", help="run directory (default: runs/quickstart)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory's results")
    p.set_defaults(func=cmd_quickstart)

    p = recipe_command(sub, "train", "run a recipe's stages", cmd_train)
    p.add_argument("--stage", default="all", choices=("sft", "reward", "rl", "ppo", "dpo", "all"),
                   help="stage(s) to run; rl = online RL with ppo.algorithm (ppo, grpo, rloo, reinforce_pp; 'ppo' is "
                   "the same stage under its old name); all = sft, reward, rl, or sft, dpo with dpo.enabled=true")
    p.add_argument("--output-dir", help="run directory; overrides the recipe's run_dir")
    p.add_argument("--overwrite", action="store_true", help="replace this stage's existing results")

    p = recipe_command(sub, "plan", "the memory plan per phase for a recipe", cmd_plan)
    p.add_argument("--budget", help="memory budget, e.g. 24GiB (default: the recipe's memory.budget)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")

    p = sub.add_parser("generate", help="answer a prompt with a run's trained policy")
    p.add_argument("run", help="run directory")
    p.add_argument("--prompt", required=True, action="append", help="prompt text (repeat for several)")
    p.add_argument("--role", default="policy", choices=("policy", "sft", "base"), help="which adapter answers")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--truncate", action="store_true", help="cut a prompt longer than the model's context from the "
                   "left (keeping its end) instead of refusing it")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="export a run's policy: the adapter alone, or merged into a bf16 model")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--merge", action="store_true", help="merge the policy into a standalone bf16 model")
    p.add_argument("--merge-into", choices=("dequantized", "original"), help="with --merge: the weights to merge "
                   "into; dequantized (default) = the quantized base the adapter was trained on, in bf16; original = "
                   "the unquantized checkpoint (warns: the adapter never saw those weights)")
    p.add_argument("--format", default="peft", choices=("peft", "gguf"), help="peft (default): the adapter, or with "
                   "--merge a transformers model; gguf: the merged policy as one GGUF file for llama.cpp and Ollama")
    p.add_argument("--quant", default="f16", choices=("f16", "q8_0"), help="with --format gguf: the weights' type")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out (never other files)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="greedy held-out scores of the base, RUN/sft and RUN/policy (table + JSON)")
    p.add_argument("run", help="run directory")
    p.add_argument("--task", choices=TASK_NAMES, help="a built-in task's held-out set and scores (text2sql also "
                   "reports text2sql_shapes: questions of shapes training never had)")
    p.add_argument("--held-out", help="instead: a prompts table (file, bundled:NAME or hub id)")
    p.add_argument("--reward", action="append", help="instead: a module:function scorer (repeat for several)")
    p.add_argument("--max-samples", type=int, default=0, help="use at most this many held-out rows; 0 = all")
    p.add_argument("--max-new-tokens", type=int, help="tokens per answer (default: the task's)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="RL vs SFT over seeds on a held-out set: per-seed gains, the mean gain with "
                       "a 95%% interval and paired tests (JSON, markdown, plot)")
    p.add_argument("runs", nargs="*", help="run directories, one RL seed each, all from one SFT adapter")
    p.add_argument("--out", required=True, help="where compare.json, compare.md and compare.png go (and seed-N runs)")
    p.add_argument("--task", default="clickbait", choices=TASK_NAMES, help="held-out set and metric")
    p.add_argument("--held-out", help="instead: a prompts table (file, bundled:NAME or hub id)")
    p.add_argument("--reward", action="append", help="with --held-out: a module:function scorer (the first is the "
                   "compared metric)")
    p.add_argument("--train-from", help="first run the RL stage per seed from a copy of this run (its sft, reward)")
    p.add_argument("--recipe", help="with --train-from: the recipe of the RL stage")
    p.add_argument("--seeds", type=int, nargs="+", help="with --train-from: the seeds, e.g. 0 1 2 3 4")
    p.add_argument("--set", action="append", metavar="key=value", help="with --train-from: a recipe override")
    p.add_argument("--policy", default="final", choices=("final", "best"), help="each seed's final RUN/policy, or "
                   "RUN/best (chosen on the recipe's eval_prompts; refused when those are the held-out set)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("serve", help="an OpenAI-compatible API for a run: models base, sft, policy and best")
    p.add_argument("run", help="run directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request")
    p.add_argument("--max-tokens", type=int, default=512, help="the most tokens one answer may ask for")
    p.add_argument("--compare", default="sft,policy", help="the two models the /feedback page shows side by side "
                   "(default sft,policy; none = no page)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("verify", help="check every adapter, head and checkpoint of a run against its manifest")
    p.add_argument("run", help="run directory")
    p.add_argument("--seal", action="store_true", help="record checksums for adapters written before manifests "
                   "existed (after checking their files open)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("config", help="every recipe key with its type, default, allowed values and help (markdown)")
    p.add_argument("--out", help="write it to this file (e.g. docs/config.md) instead of printing it")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("bench", help="memory and speed: our one-base layout against the four-model layout")
    from .bench import args as bench_args

    bench_args.add_arguments(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come before or after options (argparse alone would refuse the latter)
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if "=" not in a or a.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "datasets", "transformers", "peft", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # SIGTERM outside the PPO loop (which handles it itself) unwinds like Ctrl-C: the run directory's lock is
    # released and TRL's scratch folders removed, then exit 143.
    previous = (signal.signal(signal.SIGTERM, raise_interrupted)
                if threading.current_thread() is threading.main_thread() else None)
    try:
        return args.func(args)
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", signal.SIGINT)
        what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        print(f"{what}: {getattr(err, 'advice', Interrupted(signum).advice)}", file=sys.stderr)
        return 128 + signum
    except user_errors() as err:
        if args.debug:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
