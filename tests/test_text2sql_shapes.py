"""Composed text-to-SQL questions (data/text2sql_shapes.py): shapes split by hash, the held-out shapes never
trained on nor asked by the hand templates, every gold query runs with a non-trivial, untied answer."""

import random
import re

from lowrank_rlhf.data import load_prompts, load_sft
from lowrank_rlhf.data.tables import BUNDLED_DIR
from lowrank_rlhf.data.text2sql import TEMPLATES, build_text2sql_rows
from lowrank_rlhf.data.text2sql_shapes import (
    SHAPE_FILES,
    all_shapes,
    build_shape_rows,
    compose,
    seen_skeleton,
    shape_kinds,
    shape_split,
    skeleton,
    write_shape_files,
)
from lowrank_rlhf.rewards import sql_execution


def test_bundled_shape_files_match_the_generator(tmp_path):
    counts = write_shape_files(tmp_path)
    for stem in SHAPE_FILES:
        assert (tmp_path / f"{stem}.jsonl").read_text() == (BUNDLED_DIR / f"{stem}.jsonl").read_text(), \
            f"{stem}.jsonl is stale: run python -c 'from lowrank_rlhf.data.text2sql_shapes import " \
            f"write_shape_files; write_shape_files()'"
    assert counts["text2sql_shapes_validation"] == 120 and counts["text2sql_shapes_heldout"] == 240
    # RL prompts for every training shape, demonstrations for about half of them
    assert counts["text2sql_shapes_prompts"] > counts["text2sql_shapes_sft"] > 200


def test_held_out_shapes_are_in_no_other_split_and_no_template_asks_them():
    held = load_prompts("bundled:text2sql_shapes_heldout", name="data.eval_prompts")
    validation = load_prompts("bundled:text2sql_shapes_validation", name="data.eval_prompts")
    train = build_shape_rows("train")
    held_shapes = set(held["shape"])
    rl = load_prompts("bundled:text2sql_shapes_prompts")
    sft = load_sft("bundled:text2sql_shapes_sft")
    assert set(rl["shape"]) <= {r["shape"] for r in train} and set(rl["shape"]) & {r["shape"] for r in train}
    assert not {skeleton(row[0]["content"]) for row in sft["completion"]} & {skeleton(sql) for sql in held["gold_sql"]}
    assert len(held_shapes) == len(held)  # one question per shape: the set measures breadth
    assert not held_shapes & set(validation["shape"]) and not held_shapes & {r["shape"] for r in train}
    assert all(shape_split(s) == "train" for s in {r["shape"] for r in train})
    template_rows = [r for rows in build_text2sql_rows().values() for r in rows if "gold_sql" in r]
    templates = {skeleton(r["gold_sql"]) for r in template_rows}
    assert templates and not templates & {skeleton(sql) for sql in held["gold_sql"]}
    assert not templates & {skeleton(sql) for sql in validation["gold_sql"]}


def test_the_templates_own_shapes_are_recognised_as_seen():
    for template in TEMPLATES:
        values = template.values[0]
        assert seen_skeleton(template.sql.format(**values)), template.sql
    assert not seen_skeleton("SELECT AVG(amount) FROM orders WHERE status = 'paid';")


def test_every_held_out_gold_query_runs_and_scores_itself_one():
    held = load_prompts("bundled:text2sql_shapes_heldout", name="data.eval_prompts")
    golds, dbs = held["gold_sql"], held["db_id"]
    assert sql_execution([""] * len(held), golds, gold_sql=golds, db_id=dbs) == [1.0] * len(held)
    # and a query of another shape on the same database scores 0: the answers tell shapes apart
    shifted = golds[1:] + golds[:1]
    wrong = sql_execution([""] * len(held), shifted, gold_sql=golds, db_id=dbs)
    assert sum(wrong) / len(wrong) < 0.1


def test_every_part_of_a_held_out_question_decides_its_answer():
    """No filter or HAVING that changes nothing, no single-group "per X", no tie in or at the edge of a top k."""
    import sqlite3

    from lowrank_rlhf.data.text2sql import REFERENCE_DATE, build_database

    dbs: dict[str, sqlite3.Connection] = {}
    checked = {"conditions": 0, "having": 0, "top": 0}
    for split in ("heldout", "validation"):
        table = load_prompts(f"bundled:text2sql_shapes_{split}", name="data.eval_prompts")
        for sql, db in zip(table["gold_sql"], table["db_id"]):
            conn = dbs.setdefault(db, build_database(db))

            def run(query: str, conn=conn) -> list[tuple]:
                return conn.execute(query.replace("'now'", f"'{REFERENCE_DATE}'")).fetchall()

            result = run(sql)
            assert result and result not in ([(0,)], [(None,)]), sql
            where = re.search(r" WHERE (.*?)(?= GROUP BY| ORDER BY|;)", sql)
            conditions = where.group(1).split(" AND ") if where else []
            if any(" BETWEEN " in c for c in conditions):
                conditions = re.split(r" AND (?!\d)", where.group(1))
            for i in range(len(conditions)):
                rest = conditions[:i] + conditions[i + 1:]
                weaker = sql.replace(where.group(0), f" WHERE {' AND '.join(rest)}" if rest else "")
                if " LIMIT " in sql:  # a top k is compared in order, as the reward does (its gold orders)
                    assert run(weaker) != result, (sql, conditions[i])
                else:
                    assert sorted(map(repr, run(weaker))) != sorted(map(repr, result)), (sql, conditions[i])
                checked["conditions"] += 1
            if " HAVING " in sql:
                assert sorted(map(repr, run(re.sub(r" HAVING [^;]*", "", sql)))) != sorted(map(repr, result)), sql
                checked["having"] += 1
            if " LIMIT " in sql:
                k = int(sql.rsplit("LIMIT ", 1)[1].rstrip(";"))
                ranking = run(sql.replace("SELECT ", "SELECT COUNT(*), ", 1).rsplit(" LIMIT", 1)[0])
                counts = [row[0] for row in ranking]
                assert len(set(counts[:k + 1])) == k + 1, (sql, counts[:k + 1])
                checked["top"] += 1
            elif " GROUP BY " in sql:
                assert len(result) >= 2, sql
    assert min(checked.values()) > 5, checked


def test_the_held_out_set_spans_every_kind_of_clause_and_database():
    held = load_prompts("bundled:text2sql_shapes_heldout", name="data.eval_prompts")
    kinds = {kind for shape in held["shape"] for kind in shape_kinds(shape)}
    of = {part: {k.split(":")[1] for k in kinds if k.startswith(part + ":")} for part in ("measure", "filter", "group")}
    assert of["measure"] == {"count", "count_distinct", "sum", "avg", "min", "max", "list"}
    assert of["filter"] == {"eq", "neq", "in", "not_in", "null", "not_null", "gt", "lt", "between", "above_avg",
                            "below_avg", "window"}
    assert of["group"] == {"none", "per", "having", "top"} and "join" in kinds
    assert set(held["db_id"]) == {"events", "shop", "library"}
    sql = " ".join(held["gold_sql"])
    for clause in ("JOIN", "GROUP BY", "HAVING", "ORDER BY", "LIMIT", "BETWEEN", " IN (", "!=", "DISTINCT", " NOT IN (",
                   " IS NULL", " IS NOT NULL", "(SELECT AVG("):
        assert clause in sql, clause


def test_a_question_states_its_values_and_today_when_it_counts_days():
    shapes = [s for s in all_shapes() if any(kind == "window" for kind, _ in s.filters)]
    question = compose(shapes[0], random.Random(0))
    assert question.dated and "date('now'" in question.sql
    days = re.search(r"'-(\d+) days'", question.sql).group(1)
    assert days in question.text or {"7": "week", "14": "two weeks"}.get(days, "?") in question.text
    held = load_prompts("bundled:text2sql_shapes_heldout", name="data.eval_prompts")
    for prompt, sql in zip(held["prompt"], held["gold_sql"]):
        assert ("-- Today is" in prompt[0]["content"]) == ("'now'" in sql)
        for literal in re.findall(r"'([^']*)'", sql.replace("'now'", "")):
            if not literal.startswith("-"):
                assert literal in prompt[0]["content"], (literal, prompt[0]["content"])


def test_the_build_is_deterministic():
    assert build_shape_rows("heldout") == build_shape_rows("heldout")


def test_the_breakdown_script_scores_saved_answers_per_clause_kind(tmp_path):
    """scripts/text2sql_shapes_breakdown.py re-scores eval's saved answers: the gold query right, anything else
    wrong, counted once per kind of clause the question has."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    held = load_prompts("bundled:text2sql_shapes_heldout", name="data.eval_prompts")
    having = [" HAVING " in sql for sql in held["gold_sql"]]
    answers = [("SELECT 1;" if h else sql) for sql, h in zip(held["gold_sql"], having)]  # every HAVING one wrong
    (tmp_path / "eval-text2sql_shapes.json").write_text(json.dumps({"results": {"sft": {"answers": answers}}}))
    script = Path(__file__).parents[1] / "scripts" / "text2sql_shapes_breakdown.py"
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines()[1:]}
    right = len(held) - sum(having)
    assert f"{right / len(held):.1%} of {len(held)}" in out.stdout.splitlines()[0]
    assert lines["group:having"] == ["0.0%", "of", str(sum(having))]
    assert lines["group:per"][0] == "100.0%" and lines["filter:not_in"][0] != "0.0%"
    wrong = subprocess.run([sys.executable, str(script), str(tmp_path), "--model", "policy"], capture_output=True,
                           text=True, timeout=300)
    assert wrong.returncode == 2 and "allowed values: sft" in wrong.stderr
