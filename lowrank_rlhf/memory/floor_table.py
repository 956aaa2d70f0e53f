"""The floor table of docs/memory.md: each known shape's static floor with and without each memory lever, and what
the logits of a micro-batch cost for 32k-152k vocabularies, computed by the planner.

    python -m lowrank_rlhf.memory.floor_table            rewrite the table between the markers in docs/memory.md
    python -m lowrank_rlhf.memory.floor_table --check    exit 1 if the committed table is stale

tests/test_memory.py regenerates the table and fails when the committed one differs, so the doc cannot drift from
the formulas.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..models.shapes import LLAMA2_7B, LLAMA2_13B, LLAMA2_70B, LLAMA31_8B, LLAMA_33B, LLAMA_65B, QWEN3_8B, ModelShape
from .estimate import SCORE_LOGITS_COPIES, TRAIN_LOGITS_COPIES, AdapterSpec, logits_tokens, static_floor, weight_bytes
from .sizes import format_bytes

__all__ = ["BEGIN", "END", "render", "update"]

BEGIN = "<!-- floor-table:begin (python -m lowrank_rlhf.memory.floor_table) -->"
END = "<!-- floor-table:end -->"
DOC = Path(__file__).resolve().parents[2] / "docs" / "memory.md"

SHAPES: tuple[tuple[str, ModelShape], ...] = (
    ("LLaMA-2-7B", LLAMA2_7B), ("LLaMA-2-13B", LLAMA2_13B), ("LLaMA-1-33B", LLAMA_33B), ("LLaMA-1-65B", LLAMA_65B),
    ("Llama-2-70B", LLAMA2_70B), ("Llama-3.1-8B", LLAMA31_8B), ("Qwen3-8B", QWEN3_8B),
)
COMPUTE_BYTES = 2  # bf16
# The PPO layout with a separate critic (policy + value trained, sft + reward frozen, value and reward heads), r=16 on
# every linear, and each lever alone on top of it, then all of them.
BASELINE = dict(r=16, targets="all-linear", n_trainable=2, n_frozen=2, n_trainable_heads=1, n_frozen_heads=1)
COLUMNS: tuple[tuple[str, dict], ...] = (
    ("4-bit baseline", {}),
    ("+ 8-bit optimizer", dict(optim="adamw_8bit")),
    ("+ frozen adapters in bf16", dict(frozen_param_bytes=COMPUTE_BYTES)),
    ("+ shared critic", dict(n_trainable=1)),
    ("all levers", dict(optim="adamw_8bit", frozen_param_bytes=COMPUTE_BYTES, n_trainable=1)),
)
# The logits of one micro-batch: 8 sequences x 256 response tokens, whole or in chunks of 512 tokens.
LOGITS_MICRO_BATCH, LOGITS_RESPONSE, LOGITS_CHUNK = 8, 256, 512
VOCABULARIES = (("LLaMA-1/2", LLAMA2_7B), ("Llama-3.1", LLAMA31_8B), ("Qwen3", QWEN3_8B))


def _gib(n: int) -> str:
    return format_bytes(n, "GiB").replace(" GiB", "")


def floor_rows() -> list[list[str]]:
    rows = []
    for label, shape in SHAPES:
        floors = [static_floor(shape, "4bit", AdapterSpec(**{**BASELINE, **change}), COMPUTE_BYTES)["total"]
                  for _, change in COLUMNS]
        rows.append([label, _gib(weight_bytes(shape, "4bit", COMPUTE_BYTES))] + [_gib(f) for f in floors])
    return rows


def logits_rows() -> list[list[str]]:
    rows = []
    for label, shape in VOCABULARIES:
        per_token = shape.vocab_size * 4  # one fp32 logit row
        whole = logits_tokens(LOGITS_MICRO_BATCH, LOGITS_RESPONSE) * per_token
        chunk = logits_tokens(LOGITS_MICRO_BATCH, LOGITS_RESPONSE, LOGITS_CHUNK) * per_token
        rows.append([f"{label} ({shape.vocab_size:,})", format_bytes(per_token, "KiB"),
                     _gib(SCORE_LOGITS_COPIES * whole), _gib(SCORE_LOGITS_COPIES * chunk),
                     _gib(TRAIN_LOGITS_COPIES * whole), _gib(TRAIN_LOGITS_COPIES * chunk)])
    return rows


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def render() -> str:
    """The block between the markers, markers included."""
    lines = [BEGIN, "",
             "Static floor in GiB (bf16 compute, NF4 base, LoRA r=16 on every linear; baseline = PPO with a separate "
             "critic: policy and value trained with fp32 AdamW, sft and reward frozen in fp32, value and reward "
             "heads; each lever alone, then all three; `ppo.logits_chunk_tokens` does not change the floor):", ""]
    lines += _markdown(["shape", "4-bit weights"] + [label for label, _ in COLUMNS], floor_rows())
    lines += ["", f"fp32 logits of one micro-batch of {LOGITS_MICRO_BATCH} x {LOGITS_RESPONSE} response tokens, in "
              f"GiB: scoring holds {SCORE_LOGITS_COPIES} copies, training's loss backward {TRAIN_LOGITS_COPIES}; "
              f"chunked = `ppo.logits_chunk_tokens: {LOGITS_CHUNK}`:", ""]
    lines += _markdown(["vocabulary", "per token", "score", f"score, chunks of {LOGITS_CHUNK}", "train",
                        f"train, chunks of {LOGITS_CHUNK}"], logits_rows())
    return "\n".join(lines + ["", END])


def update(path: Path = DOC, check: bool = False) -> bool:
    """Write the table between the markers of `path`; with `check`, only say whether it is current."""
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{path}: the floor-table markers are missing ({BEGIN!r} ... {END!r})")
    start, end = text.index(BEGIN), text.index(END) + len(END)
    current = text[start:end] == render()
    if not check and not current:
        path.write_text(text[:start] + render() + text[end:])
    return current


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", type=Path, default=DOC, help="the markdown file holding the markers")
    parser.add_argument("--check", action="store_true", help="exit 1 if the table there is stale; write nothing")
    args = parser.parse_args(argv)
    current = update(args.path, check=args.check)
    print(f"{args.path}: floor table {'current' if current else ('stale' if args.check else 'rewritten')}")
    return 1 if args.check and not current else 0


if __name__ == "__main__":
    sys.exit(main())
