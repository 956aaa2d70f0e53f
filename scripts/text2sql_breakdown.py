"""Per-template text-to-SQL accuracy of one adapter of a run: greedy, and optionally pass@k of sampled answers.

    .venv/bin/python scripts/text2sql_breakdown.py RUN [--role sft|policy|base] [--table heldout|prompts|validation]
                                                   [--samples K --temperature T] [--json OUT]

`lowrank-rlhf eval --task text2sql` gives one number per model; this shows which kinds of question (the templates
of lowrank_rlhf/data/text2sql.py) a model gets right, and with --samples whether a right query is within its reach
at all (pass@k): a 0/1 execution reward gives RL no signal on questions no sample gets right. Sampling uses
transformers' generate (multinomial, seeded), which is all an analysis needs; greedy answers equal the eval's.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

from lowrank_rlhf.commands.inference import load_run
from lowrank_rlhf.data.chat import left_pad, prompt_ids
from lowrank_rlhf.data.tables import BUNDLED_DIR
from lowrank_rlhf.data.text2sql import TEMPLATES, template_of
from lowrank_rlhf.rewards.sql import sql_execution


def answers(model, role: str, rows: list[dict], samples: int, temperature: float, batch: int = 8):
    """(greedy answers, [samples answers per row]) for the rows' chat prompts."""
    tok = model.tokenizer
    greedy, sampled = [], []
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        ids, mask = left_pad([prompt_ids(tok, r["prompt"]) for r in chunk], tok.pad_token_id)  # the eval's encoding
        width = ids.shape[1]
        common = dict(max_new_tokens=64, eos_token_id=tok.eos_token_id)
        out = model.generate(role, ids, mask, do_sample=False, **common)
        greedy += tok.batch_decode(out[:, width:], skip_special_tokens=True)
        if samples:
            out = model.generate(role, ids.repeat_interleave(samples, 0), mask.repeat_interleave(samples, 0),
                                 do_sample=True, temperature=temperature, top_k=0, top_p=1.0, **common)
            texts = tok.batch_decode(out[:, width:], skip_special_tokens=True)
            sampled += [texts[i * samples:(i + 1) * samples] for i in range(len(chunk))]
        print(f"{min(start + batch, len(rows))}/{len(rows)}", file=sys.stderr, flush=True)
    return greedy, sampled


def right(rows: list[dict], texts: list[str]) -> list[float]:
    return sql_execution([""] * len(rows), texts, [r["gold_sql"] for r in rows], [r["db_id"] for r in rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--role", default="policy", choices=("policy", "sft", "base"))
    p.add_argument("--table", default="heldout", choices=("heldout", "prompts", "validation"))
    p.add_argument("--samples", type=int, default=0, help="sampled answers per question for pass@k (0: greedy only)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write every answer here (refused if the file exists)")
    args = p.parse_args(argv)
    if args.json and args.json.exists():
        print(f"error: --json {args.json} exists; give a new path", file=sys.stderr)
        return 2
    if args.samples < 0 or args.temperature <= 0:
        print("error: --samples must be >= 0 and --temperature > 0", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    rows = [json.loads(line) for line in (BUNDLED_DIR / f"text2sql_{args.table}.jsonl").open()]
    model = load_run(args.run, roles=("sft",) if args.role in ("sft", "base") else ("policy",))
    greedy, sampled = answers(model, args.role, rows, args.samples, args.temperature)
    greedy_ok = right(rows, greedy)
    sampled_ok = [right([r] * len(s), s) for r, s in zip(rows, sampled)]
    per = defaultdict(lambda: [0, 0, 0])  # questions, greedy right, some sample right
    for i, r in enumerate(rows):
        t = per[template_of(r["gold_sql"])]
        t[0] += 1
        t[1] += int(greedy_ok[i])
        t[2] += int(any(sampled_ok[i])) if sampled else 0
    k = f"pass@{args.samples}" if args.samples else ""
    print(f"{args.run} {args.role} on text2sql_{args.table}: template, questions, greedy right{', ' + k if k else ''}")
    for n in sorted(per, key=lambda n: -1 if n is None else n):
        q, g, s = per[n]
        sql = TEMPLATES[n].sql if n is not None else "(no template)"
        print(f"  T{n}\t{q}\t{g}" + (f"\t{s}" if k else "") + f"\t{sql[:80]}")
    total = [sum(v[j] for v in per.values()) for j in range(3)]
    print(f"total\t{total[0]}\t{total[1]}" + (f"\t{total[2]}" if k else ""))
    if args.json:
        args.json.write_text(json.dumps([{"gold_sql": r["gold_sql"], "template": template_of(r["gold_sql"]),
                                          "greedy": g, "greedy_right": bool(ok), "samples": s,
                                          "samples_right": [bool(x) for x in sok]}
                                         for r, g, ok, s, sok in zip(rows, greedy, greedy_ok,
                                                                     sampled or [[]] * len(rows),
                                                                     sampled_ok or [[]] * len(rows))], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
