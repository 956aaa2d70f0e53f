"""Accuracy per clause kind on the unseen-shapes held-out set, from the answers `eval` already saved.

    .venv/bin/python scripts/text2sql_shapes_breakdown.py RUN [RUN ...] [--model sft|policy|base|...]

Reads RUN/eval-text2sql_shapes.json (`lowrank-rlhf eval RUN --task text2sql_shapes` or `--task text2sql` writes it)
and scores each saved answer again with `sql_execution`, grouped by the parts of its question's shape
(lowrank_rlhf/data/text2sql_shapes.py): what is computed, each filter kind, the grouping, a join, and the lists asked
in alphabetical order. A kind a model never gets right is one a 0/1 execution reward cannot teach it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from lowrank_rlhf.data import load_prompts
from lowrank_rlhf.data.text2sql_shapes import shape_kinds
from lowrank_rlhf.rewards.sql import sql_execution


def kinds(shape: str, gold_sql: str) -> list[str]:
    """The shape's clause kinds, and `ordered list` for a list asked in alphabetical order (a draw, not a shape)."""
    ordered = "measure:list" in shape_kinds(shape) and " ORDER BY " in gold_sql
    return shape_kinds(shape) + (["ordered list"] if ordered else [])


def fail(message: str) -> None:
    """Bad input: one line on stderr, exit 2 (the CLI's convention)."""
    print(f"text2sql_shapes_breakdown: {message}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--model", default="sft", help="a label of the eval report: base, sft, policy, best (step N)")
    args = parser.parse_args()
    held = load_prompts("bundled:text2sql_shapes_heldout", name="data.eval_prompts")
    for run in args.runs:
        path = run / "eval-text2sql_shapes.json"
        if not path.is_file():
            fail(f"{path} does not exist; run `lowrank-rlhf eval {run} --task text2sql_shapes` first")
        results = json.loads(path.read_text())["results"]
        if args.model not in results:
            fail(f"--model {args.model!r} is not in {path}; allowed values: {', '.join(results)}")
        answers = results[args.model]["answers"]
        scores = sql_execution([""] * len(answers), answers, gold_sql=held["gold_sql"], db_id=held["db_id"])
        by_kind = defaultdict(list)
        for shape, gold, score in zip(held["shape"], held["gold_sql"], scores):
            for kind in kinds(shape, gold):
                by_kind[kind].append(score)
        print(f"{run} {args.model}: {sum(scores) / len(scores):.1%} of {len(scores)}")
        for kind in sorted(by_kind):
            right = by_kind[kind]
            print(f"  {kind:24s} {sum(right) / len(right):6.1%} of {len(right)}")


if __name__ == "__main__":
    main()
