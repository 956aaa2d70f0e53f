"""One bench run: every asked layout in turn under the same budget, the report written after each one.

With --isolate (on CPU by default when more than one layout runs) each layout runs in a child process of its own
(`python -m lowrank_rlhf.bench.child ARGS.json`): a process's peak RSS never goes down, so only then is a layout's
peak RSS its own and not the high-water mark of the layouts before it."""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import logging
import platform
import subprocess
import sys
import tempfile
import traceback
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate.utils.memory import clear_device_cache

from ..memory.plan import MemoryBudgetError, enforce_budget
from .args import BenchArgumentError, add_arguments, check_sizes, resolve_defaults
from .four_model import plan_four_model
from .measure import empty_layout, lookup_bandwidth, run_layout
from .report import checks, markdown, ratios, write_outputs
from .workload import Workload

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DESCRIPTION = ("memory and speed of RL on one base: ours against the four-model layout (PPO) or TRL's GRPOTrainer "
               "(--algorithm grpo --layouts ours,trl-grpo)")


def _versions() -> dict:
    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            **{name: version(name) for name in ("transformers", "peft", "bitsandbytes", "accelerate", "trl",
                                                "lowrank_rlhf")}}


def _device_info(device: torch.device, bandwidth: float | None, source: str | None) -> dict:
    cuda = device.type == "cuda"
    return {"type": device.type, "name": torch.cuda.get_device_name(device) if cuda else platform.processor() or
            platform.machine(), "total_memory_bytes": torch.cuda.get_device_properties(device).total_memory
            if cuda else None, "bandwidth_bytes_per_s": bandwidth, "bandwidth_source": source}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def free_memory(device: torch.device) -> None:
    """What a finished layout leaves behind goes before the next one is built (its peaks would include it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    clear_device_cache(garbage_collection=True)


def run_bench(args: argparse.Namespace) -> dict:
    """Run every asked layout and return the report (also written to --json, .md and .png)."""
    resolve_defaults(args)
    work = Workload(args)
    device = work.device
    isolate = should_isolate(args, work)
    work.bandwidth, bandwidth_source = lookup_bandwidth(device, args.bandwidth)
    report = {
        "schema_version": SCHEMA_VERSION,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": _device_info(device, work.bandwidth, bandwidth_source),
        "versions": _versions(),
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "func"},
        "algorithm": {"name": args.algorithm, "num_generations": args.num_generations, "beta": args.beta,
                      "reward": None if work.critic else args.reward},
        "model": {"name": work.model_name, "random_weights": work.random, "quantization": args.quantization,
                  "compute_dtype": str(work.dtype).replace("torch.", ""), "shape": asdict(work.shape)},
        "workload": {"batch": args.batch, "prompt_len": args.prompt_len, "response_len": args.response_len,
                     "warmup_steps": args.warmup, "measured_steps": args.steps, "ppo_epochs": args.ppo_epochs,
                     "mini_batches": args.mini_batches, "lora_r": args.lora_r,
                     "logits_chunk_tokens": args.logits_chunk_tokens,
                     "num_generations": args.num_generations, "responses_per_step": work.rows,
                     "tokens_per_step": work.rows * (args.prompt_len + args.response_len)},
        "isolated_layouts": isolate,
        "budget_bytes": work.budget_bytes,
        "layouts": {},
        "ratios": {},
        "checks": [],
    }
    if device.type == "cuda":
        enforce_budget(work.budget_bytes, device)
    four_plan, four_plan_error = None, None
    if "four-model" in work.layouts or "ours-matched" in work.layouts:
        try:
            four_plan = plan_four_model(work.cfg, work.budget_bytes, work.shape)
        except ValueError as err:  # MemoryBudgetError: the three bases alone exceed the budget
            four_plan_error = str(err)
    if len(work.layouts) == 1 or getattr(args, "_layout_process", False):
        work.rss_scope = "the layout's own process"
    with tempfile.TemporaryDirectory(prefix="lowrank_rlhf_bench_") as tmp:
        run_root = Path(args.run_dir) if args.run_dir else Path(tmp)
        for layout in work.layouts:
            result = report["layouts"][layout] = empty_layout(layout)
            four = report["layouts"].get("four-model")
            used = (four["micro_batches_measured"] if four and four["status"] == "ok"
                    else getattr(args, "_four_model_used", None))  # a child process: the parent's
            status, error = "ok", None
            try:
                if isolate:
                    result.update(run_in_child(args, layout, Path(tmp), used))
                elif layout == "trl-grpo":
                    from .trl_grpo import run_trl_grpo  # TRL is imported by this layout only

                    run_trl_grpo(work, result, run_root)
                else:
                    run_layout(work, layout, result, four_plan, four_plan_error, used, run_root)
            except (KeyboardInterrupt, SystemExit):
                raise
            except MemoryBudgetError as err:  # the planner: not even micro-batch 1 fits; nothing was built
                status, error = "does-not-fit", f"{type(err).__name__}: {err}"
            except Exception as err:  # e.g. an OOM at micro-batch 1: record it and go on with the other layouts
                status, error = "error", f"{type(err).__name__}: {_first_line(err)}"
                result["traceback"] = traceback.format_exc(limit=8)
            # outside the except block: the traceback and the tensors its frames held are gone
            if isolate and status == "ok":  # the child's own verdict
                status, error = result["status"], result["error"]
            result["status"], result["error"] = status, error
            if error:
                log.warning("layout %s: %s", layout, error)
            free_memory(device)
            # after every layout, so a run cut short by a time limit still leaves its measurements
            report["ratios"] = ratios(report["layouts"])
            report["checks"] = checks(report, work)
            write_outputs(report, Path(args.json))
    return report


def should_isolate(args: argparse.Namespace, work: Workload) -> bool:
    """--isolate: on, off, or auto = a CPU run of more than one layout (on CUDA the peaks are reset per layout)."""
    if getattr(args, "_layout_process", False):
        return False
    if args.isolate == "auto":
        return work.device.type == "cpu" and len(work.layouts) > 1
    return args.isolate == "on"


def run_in_child(args: argparse.Namespace, layout: str, tmp: Path, four_model_used: dict | None) -> dict:
    """Run `layout` alone in a child process (bench/child.py) and return its result as the child measured it."""
    child_json = tmp / f"{layout}.json"
    child_args = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "func"}
    child_args.update(layouts=layout, json=str(child_json), isolate="off", _four_model_used=four_model_used)
    args_file = tmp / f"{layout}.args.json"
    args_file.write_text(json.dumps(child_args))
    proc = subprocess.run([sys.executable, "-m", "lowrank_rlhf.bench.child", str(args_file)])
    if not child_json.is_file():
        raise RuntimeError(f"the child process of layout {layout} exited with {proc.returncode} and wrote no report")
    return json.loads(child_json.read_text())["layouts"][layout]


def run(args: argparse.Namespace) -> int:
    """`lowrank-rlhf bench`: 0 when every layout ran, 1 when one failed (its error is in the JSON)."""
    check_sizes(args)
    report = run_bench(args)
    print(markdown(report))
    print(f"wrote {report['outputs']['json']}, {report['outputs']['markdown']}, {report['outputs']['plot']}")
    return 0 if all(r["status"] == "ok" for r in report["layouts"].values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m lowrank_rlhf.bench", description=DESCRIPTION,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        return run(parser.parse_args(argv))
    except BenchArgumentError as err:  # the same one line and exit code as `lowrank-rlhf bench`
        print(f"error: {err}", file=sys.stderr)
        return 2
