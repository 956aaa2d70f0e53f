"""The bench's report: ratios ours / four-model and ours / trl-grpo, the issues' targets as checks, and the markdown
table and plot written beside the JSON."""

from __future__ import annotations

import json
from pathlib import Path

from ..memory import PHASES
from ..memory.sizes import format_bytes
from .measure import ratio
from .workload import Workload

# Targets from the issue (benchmark results, not timed tests).
TARGET_PEAK_BYTES = {"llama2-7b": 10 * 1024**3, "llama2-13b": 16 * 1024**3,
                     "llama-33b": 24 * 1024**3}  # issue 16: LLaMA-33B PPO on one 24 GB card
TARGET_PEAK_RATIO = 0.6
TARGET_STEP_RATIO = 0.8
# ours against TRL's GRPOTrainer (issue 13): step time (median) and peak memory (RSS on CPU, allocated on a GPU)
TARGET_TRL_STEP_RATIO = 0.8
TARGET_TRL_PEAK_RATIO = 0.7
TARGET_PLANNER_ERROR = 0.15
TARGET_DECODE_OVER_FLOOR = 5.0
TARGET_BUILD_S = 120.0


# ================================================================================================ ratios and checks
def _figures(result: dict) -> dict:
    peak = result.get("peak_bytes") or {}
    step = peak.get("step", {})
    return {"peak_allocated": step.get("allocated"), "peak_reserved": step.get("reserved"),
            "step_time_s": result.get("step_time_s"), "step_time_median_s": result.get("step_time_median_s"),
            "peak_rss_bytes": result.get("peak_rss_bytes"),
            "generate_tokens_per_s": result.get("generate_tokens_per_s"),
            "train_tokens_per_s": result.get("train_tokens_per_s"),
            "decode_ms_per_step": result.get("decode_ms_per_step"),
            **{f"peak_allocated_{p}": (peak.get(p) or {}).get("allocated") for p in PHASES}}


def ratios(layouts: dict) -> dict:
    """ours / four-model, ours-matched / four-model and ours / trl-grpo for every figure both layouts measured."""
    out = {}
    for name, baseline in (("ours", "four-model"), ("ours-matched", "four-model"), ("ours", "trl-grpo")):
        mine, base = layouts.get(name), layouts.get(baseline)
        if not base or not mine or base["status"] != "ok" or mine["status"] != "ok":
            continue
        a, b = _figures(mine), _figures(base)
        out[f"{name}/{baseline}"] = {k: ratio(a[k], b[k]) for k in a}
    return out


def _check(name: str, value, target: float, op: str) -> dict:
    passed = None if value is None else (value <= target if op == "<=" else value >= target)
    return {"name": name, "value": value, "target": f"{op} {target:g}", "passed": passed}


def checks(report: dict, work: Workload) -> list[dict]:
    """The issue's targets, evaluated where this run measured them (None = not measured here)."""
    out = []
    layouts = report["layouts"]
    ours = layouts.get("ours")
    if ours and ours["status"] == "ok":
        peak = (ours["peak_bytes"] or {}).get("step", {}).get("allocated")
        if work.model_name in TARGET_PEAK_BYTES:
            out.append(_check(f"ours peak allocated on {work.model_name} (GiB)", peak / 1024**3 if peak else None,
                              TARGET_PEAK_BYTES[work.model_name] / 1024**3, "<="))
        for phase in PHASES:
            ratio = (ours["measured_over_predicted"] or {}).get(phase)
            out.append(_check(f"ours planner error, {phase}: abs(measured/predicted - 1)",
                              abs(ratio - 1) if ratio is not None else None, TARGET_PLANNER_ERROR, "<="))
        if work.args.batch >= 32:
            out.append(_check(f"ours decode per pass (micro-batch {ours['micro_batches']['generate']}) / "
                              f"weight-read floor", ours["decode_over_floor"], TARGET_DECODE_OVER_FLOOR, "<="))
        if work.random and work.device.type == "cuda":
            out.append(_check("random base build time (s)", ours["build_s"], TARGET_BUILD_S, "<="))
    for key, figures in report["ratios"].items():
        if key.endswith("/trl-grpo"):
            cuda = work.device.type == "cuda"
            memory = figures["peak_allocated"] if cuda else figures["peak_rss_bytes"]
            out.append(_check(f"{key} peak {'allocated' if cuda else 'RSS'}", memory, TARGET_TRL_PEAK_RATIO, "<="))
            out.append(_check(f"{key} step time (median)", figures["step_time_median_s"], TARGET_TRL_STEP_RATIO,
                              "<="))
            continue
        out.append(_check(f"{key} peak allocated", figures["peak_allocated"], TARGET_PEAK_RATIO, "<="))
        out.append(_check(f"{key} step time", figures["step_time_s"], TARGET_STEP_RATIO, "<="))
    return out


# ================================================================================================ outputs
def _gib(n) -> str:
    return "-" if n is None else format_bytes(n)


def _num(x, fmt="{:.3g}") -> str:
    return "-" if x is None else fmt.format(x)


def _algorithm(report: dict) -> str:
    algo = report.get("algorithm") or {"name": "ppo", "num_generations": 1}
    beta = f", beta {algo['beta']:g}" if algo["name"] != "ppo" else ""
    return f"{algo['name']} ({algo['num_generations']} responses per prompt{beta})"


def _chunks(workload: dict) -> str:
    k = workload.get("logits_chunk_tokens")  # absent from reports written before the flag
    return f", ours' logits in chunks of {k} tokens" if k else ""


def markdown(report: dict) -> str:
    layouts = [r for r in report["layouts"].values()]
    dev, model, w = report["device"], report["model"], report["workload"]
    lines = [f"# lowrank-rlhf bench: {model['name']} ({model['quantization']}) on {dev['name']}", "",
             f"{report['date']} - {_algorithm(report)}, batch {w['batch']}, prompt {w['prompt_len']}, "
             f"response {w['response_len']} "
             f"(forced), {w['measured_steps']} measured steps after {w['warmup_steps']} warm-up, "
             f"{w['ppo_epochs']} PPO epochs, LoRA r={w['lora_r']}, budget {_gib(report['budget_bytes'])}"
             f"{_chunks(w)}; "
             f"torch {report['versions']['torch']}, bitsandbytes {report['versions']['bitsandbytes']}", ""]
    header = "| | " + " | ".join(r["layout"] for r in layouts) + " |"
    lines += [header, "|---" * (len(layouts) + 1) + "|"]

    def row(label, fn):
        cells = []
        for r in layouts:
            try:
                cells.append(fn(r) if r["status"] == "ok" else r["status"])
            except (KeyError, TypeError):
                cells.append("-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    def peak(phase, kind):
        return lambda r: _gib(r["peak_bytes"][phase][kind])

    row("micro-batches gen/score/train", lambda r: "/".join(str(r["micro_batches"][p]) for p in PHASES))
    row("gradient checkpointing", lambda r: "on" if r["gradient_checkpointing"] else "off")
    row("weights", lambda r: _gib(r["weight_bytes"]))
    for phase in PHASES:
        row(f"peak {phase} allocated / reserved",
            lambda r, p=phase: f"{peak(p, 'allocated')(r)} / {peak(p, 'reserved')(r)}")
        row(f"planner {phase} predicted [measured/predicted]",
            lambda r, p=phase: f"{_gib(r['predicted_peak_bytes'][p])} [{_num(r['measured_over_predicted'][p])}]")
    row("step time (s)", lambda r: _num(r["step_time_s"]))
    row("step time, median (s)", lambda r: _num(r["step_time_median_s"]))
    row("peak RSS", lambda r: _gib(r["peak_rss_bytes"]))
    row("peak allocated, whole step", lambda r: _gib(r["peak_bytes"]["step"]["allocated"]))
    row("generate / score / train (s)", lambda r: " / ".join(_num(r["time_s"][p]) for p in PHASES))
    row("generation tokens/s", lambda r: _num(r["generate_tokens_per_s"], "{:.1f}"))
    row("training tokens/s", lambda r: _num(r["train_tokens_per_s"], "{:.1f}"))
    row("decode ms/step (per pass)",
        lambda r: f"{_num(r['decode_ms_per_step'])} ({_num(r['decode_ms_per_step_per_pass'])})")
    row("weight-read floor ms [decode/floor]",
        lambda r: f"{_num(r['weight_read_floor_ms'])} [{_num(r['decode_over_floor'])}]")
    row("OOM events", lambda r: str(len(r["oom_events"])))
    scopes = sorted({r["peak_rss_scope"] for r in layouts if r.get("peak_rss_scope")})
    lines.append(f"\nPeak RSS: the peak resident memory of {' / '.join(scopes) or '-'}. Peaks are per phase (the "
                 "counter is reset at each phase's start), maximum over the measured "
                 "steps; reserved includes the allocator's cache carried over from earlier phases. Decode ms/step = "
                 "generate time / response length; per pass = divided by the number of generate micro-batches.")
    for r in layouts:
        if r.get("not_matched"):
            lines.append(f"\n{r['layout']}: not matched to ours: " + "; ".join(r["not_matched"]) + ".")
        if r["error"]:
            lines.append(f"\n**{r['layout']}: {r['status']}** - {r['error']}")
    if report["ratios"]:
        lines += ["", "| ratio | peak alloc | peak reserved | peak RSS | step time | step time (median) | "
                      "gen tokens/s | train tokens/s |", "|---|---|---|---|---|---|---|---|"]
        for key, f in report["ratios"].items():
            lines.append(f"| {key} | {_num(f['peak_allocated'])} | {_num(f['peak_reserved'])} | "
                         f"{_num(f['peak_rss_bytes'])} | {_num(f['step_time_s'])} | {_num(f['step_time_median_s'])} | "
                         f"{_num(f['generate_tokens_per_s'])} | {_num(f['train_tokens_per_s'])} |")
    if report["checks"]:
        lines += ["", "| target | value | goal | pass |", "|---|---|---|---|"]
        for c in report["checks"]:
            verdict = {True: "yes", False: "NO", None: "-"}[c["passed"]]
            lines.append(f"| {c['name']} | {_num(c['value'])} | {c['target']} | {verdict} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Peak memory per phase per layout (allocated bars, reserved outlines, planner estimates as ticks) and the
    step time per layout split by phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # trl-grpo has no phases of ours: its step is one bar, its memory is in the table
    ok = [r for r in report["layouts"].values() if r["status"] == "ok" and r["predicted_peak_bytes"]]
    colors = {"ours": "tab:blue", "four-model": "tab:red", "ours-matched": "tab:cyan"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(ok))
    has_memory = any(r["peak_bytes"]["step"]["allocated"] is not None for r in ok)
    for i, r in enumerate(ok):
        xs = [j + i * width for j in range(len(PHASES))]
        alloc = [(r["peak_bytes"][p]["allocated"] or 0) / 1024**3 for p in PHASES]
        reserved = [(r["peak_bytes"][p]["reserved"] or 0) / 1024**3 for p in PHASES]
        predicted = [r["predicted_peak_bytes"][p] / 1024**3 for p in PHASES]
        color = colors.get(r["layout"])
        left.bar(xs, alloc, width, color=color, label=f"{r['layout']} allocated")
        left.bar(xs, reserved, width, fill=False, edgecolor=color, linestyle="--")
        left.scatter(xs, predicted, marker="_", s=400, color="black", zorder=3,
                     label="planner estimate" if i == 0 else None)
    left.set_xticks([j + width * (len(ok) - 1) / 2 for j in range(len(PHASES))], PHASES)
    left.set_ylabel("peak memory (GiB); dashed = reserved")
    left.set_title("peak memory per phase" + ("" if has_memory else " (no CUDA: planner estimates only)"))
    if has_memory:
        left.axhline(report["budget_bytes"] / 1024**3, color="grey", linewidth=0.8, linestyle=":")
    if ok:
        left.legend(fontsize=8)
    bottom = [0.0] * len(ok)
    for phase, shade in zip(PHASES, ("0.25", "0.5", "0.75")):
        values = [r["time_s"][phase] or 0 for r in ok]
        right.bar([r["layout"] for r in ok], values, bottom=bottom, label=phase, color=shade,
                  edgecolor=[colors.get(r["layout"]) for r in ok], linewidth=2)
        bottom = [b + v for b, v in zip(bottom, values)]
    whole = [r for r in report["layouts"].values() if r["status"] == "ok" and not r["predicted_peak_bytes"]]
    if whole:
        right.bar([r["layout"] for r in whole], [r["step_time_s"] or 0 for r in whole], color="tab:orange",
                  label="whole step")
    right.set_ylabel("seconds per step")
    right.set_title("step time")
    if ok or whole:
        right.legend(fontsize=8)
    model = report["model"]
    fig.suptitle(f"{model['name']} ({model['quantization']}) on {report['device']['name']}, batch "
                 f"{report['workload']['batch']}, {report['workload']['prompt_len']}+"
                 f"{report['workload']['response_len']} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict, json_path: Path) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    md_path, png_path = json_path.with_suffix(".md"), json_path.with_suffix(".png")
    report["outputs"] = {"json": str(json_path), "markdown": str(md_path), "plot": str(png_path)}
    json_path.write_text(json.dumps(report, indent=2, default=str))
    md_path.write_text(markdown(report))
    plot(report, png_path)
