"""Text-to-SQL questions composed from parts, so the space of question shapes is large: what to compute (a count,
a distinct count, SUM/AVG/MIN/MAX, the earliest or latest time, a list of distinct values, in order or not), zero
to two filters (equality, inequality, IN, NOT IN, IS NULL / IS NOT NULL, comparisons, BETWEEN, a comparison with the
average by a subquery, a date window, a join to the other table) and a grouping (per value, per value with HAVING,
the top k by ORDER BY ... LIMIT), over the tables of data/text2sql.py.

A shape is everything but the values: `orders JOIN customers | AVG(orders.amount) | status = ? | per city`. Each
shape goes to one split by a hash of its key (training, validation or held-out), so a held-out question here has a
combination of clauses that no training question of this module has. The 16 hand-written templates of
data/text2sql.py are training shapes by definition (`seen_skeleton` finds them): the `text2sql_shapes_*` tables never
hold a question the templates already ask, only new shapes.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from functools import cache
from itertools import combinations
from pathlib import Path

from .tables import BUNDLED_DIR, write_jsonl_tables
from .text2sql import REFERENCE_DATE, TEMPLATES, WINDOWS, build_database, sql_literal, text2sql_prompt
from .text2sql_columns import SOURCES, Col, Source

SHAPE_FILES = ("text2sql_shapes_sft", "text2sql_shapes_prompts", "text2sql_shapes_validation",
               "text2sql_shapes_heldout")
SHAPE_SPLITS = (("train", 0.6), ("validation", 0.15), ("heldout", 0.25))  # shares of the shapes, by hash
QUESTIONS_PER_SHAPE = {"train": 2, "validation": 1, "heldout": 1}  # questions kept per shape: the first usable
DRAWS_PER_SHAPE = 6  # of this many draws of values (a shape whose draws are all trivial or tied has none)
# Training: the first draw of a shape is a demonstration (prompt + gold SQL) for SFT_SHAPE_SHARE of the training
# shapes; the second draw of every training shape is an RL prompt (asked, never answered), so RL meets shapes SFT
# never showed: prompts without answers are cheap, which is what RL with a verifiable reward is for.
SFT_SHAPE_SHARE = 0.5
# questions kept (a stable hash picks them): the held-out set large enough for a paired interval over seeds,
# validation smaller (it is scored at every rl.eval_steps); training: TRAIN_SIZES below
SPLIT_SIZES = {"validation": 120, "heldout": 240}
# training rows kept, by the same hash: the recipe's SFT time grows with its demonstrations (2 epochs of 465 took
# about 32 min on 2 cores), so more shapes mean fewer shapes demonstrated, not a longer recipe
TRAIN_SIZES = {"text2sql_shapes_sft": 320, "text2sql_shapes_prompts": 450}


# what to compute: (kind, column kinds it applies to)
MEASURES = (("count", None), ("count_distinct", ("category", "id")), ("sum", ("number",)), ("avg", ("number",)),
            ("min", ("number", "time")), ("max", ("number", "time")), ("list", ("category", "id")))
FILTERS = ("eq", "neq", "in", "not_in", "null", "not_null", "gt", "lt", "between", "above_avg", "below_avg",
           "window")
GROUPS = ("none", "per", "having", "top")


@dataclass(frozen=True)
class Shape:
    source: Source
    measure: tuple[str, Col | None]
    filters: tuple[tuple[str, Col], ...]
    group: tuple[str, Col | None]

    @property
    def key(self) -> str:
        def name(col):
            return col.sql if col else "*"
        parts = [self.source.key, f"{self.measure[0]}({name(self.measure[1])})",
                 "&".join(f"{kind}({col.sql})" for kind, col in self.filters) or "-",
                 f"{self.group[0]}({name(self.group[1])})"]
        return " | ".join(parts)


def shape_kinds(key: str) -> list[str]:
    """The clause kinds of a shape from its key (Shape.key's format): `measure:avg`, `filter:not_in` (one per
    filter), `group:having`, and `join` when the source joins two tables."""
    source, measure, filters, group = key.split(" | ")
    kinds = [f"measure:{measure.split('(')[0]}", f"group:{group.split('(')[0]}"]
    kinds += [f"filter:{f.split('(')[0]}" for f in filters.split("&") if f != "-"]
    return kinds + (["join"] if "+" in source else [])


def _filter_kinds(col: Col) -> tuple[str, ...]:
    if col.nullable:  # "other than X" would silently drop the NULL rows too: a trap, not a question
        return ("eq", "in", "null", "not_null")
    return {"category": ("eq", "neq", "in", "not_in"), "id": ("eq",),
            "number": ("gt", "lt", "between", "above_avg", "below_avg"), "time": ("window",)}.get(col.kind, ())


def all_shapes() -> list[Shape]:
    """Every composition this module can ask: filters on distinct columns, a group on a category column that no
    equality filter fixes, HAVING and top-k only over counts of rows, a list only without a group."""
    shapes = []
    for source in SOURCES:
        measures = [(m, None) for m, kinds in MEASURES if kinds is None] + [
            (m, col) for m, kinds in MEASURES if kinds for col in source.columns
            if col.kind in kinds and (m != "sum" or col.summable) and (m != "list" or not col.nullable)]
        single = [((kind, col),) for col in source.columns for kind in _filter_kinds(col)]
        pairs = [(a, b) for (a,), (b,) in combinations(single, 2) if a[1] != b[1]]  # two columns, any kinds
        for measure in measures:
            for filters in [()] + single + pairs:
                filtered = {col.sql for _, col in filters}
                if measure[1] and measure[1].kind in ("category", "id") and measure[1].sql in filtered:
                    continue  # "the different statuses of the orders with status paid": the filter is the answer
                used = filtered | ({measure[1].sql} if measure[1] else set())
                groups = [("none", None)] + [(g, col) for g in GROUPS[1:] for col in source.columns
                                             if col.kind in ("category", "id") and col.sql not in used
                                             and not col.nullable]
                for group in groups:
                    cols = [col for _, col in filters] + [measure[1], group[1]]
                    if source.joined and not any(col and col.sql.startswith(source.joined) for col in cols):
                        continue  # a join whose second table nothing uses only repeats the one-table shape
                    if group[0] != "none" and measure[0] == "list":
                        continue
                    if group[0] in ("having", "top") and measure[0] != "count":
                        continue
                    shapes.append(Shape(source, measure, filters, group))
    return shapes


def shape_split(key: str) -> str:
    """train | validation | heldout, by a stable hash of a shape's key."""
    share = _share(key)
    edge = 0.0
    for split, part in SHAPE_SPLITS:
        edge += part
        if share < edge:
            return split
    return SHAPE_SPLITS[-1][0]


# ------------------------------------------------------------------------------------------- words and SQL of a shape
def _filter(kind: str, col: Col, rng: random.Random) -> tuple[str, str, bool]:
    """(phrase, SQL condition, dated) for one filter with drawn values."""
    if kind == "eq":
        v = rng.choice(col.values)
        return " " + rng.choice(col.eq).format(v=v), f"{col.sql} = {sql_literal(v)}", False
    if kind == "neq":
        v = rng.choice(col.values)
        return " " + col.neq.format(v=v), f"{col.sql} != {sql_literal(v)}", False
    if kind == "in":  # the equality's words with two values: 'with status "paid" or "shipped"', 'from Oslo or Lisbon'
        a, b = rng.sample(col.values, 2)
        phrase = rng.choice(col.eq)
        either = phrase.replace('"{v}"', f'"{a}" or "{b}"') if '"{v}"' in phrase else phrase.format(v=f"{a} or {b}")
        return " " + either, f"{col.sql} IN ({sql_literal(a)}, {sql_literal(b)})", False
    if kind == "not_in":
        a, b = rng.sample(col.values, 2)
        return " " + col.not_in.format(a=a, b=b), f"{col.sql} NOT IN ({sql_literal(a)}, {sql_literal(b)})", False
    if kind in ("null", "not_null"):
        return " " + col.null[kind == "not_null"], f"{col.sql} IS {'NOT ' if kind == 'not_null' else ''}NULL", False
    if kind in ("above_avg", "below_avg"):  # a subquery: the average of all the table's rows, not the filtered ones
        year = col.one == "publication year"
        word = {"above_avg": ("above", "after"), "below_avg": ("below", "before")}[kind][year]
        # "(over all ...)" in brackets: "above the average amount of all orders that used a coupon" would leave
        # whose average it is to the next filter's words
        phrase = (f" published {word} the average year (over all books)" if year
                  else f" with an amount {word} the average (over all orders)")
        bare = col.sql.split(".")[-1]
        return phrase, f"{col.sql} {'>' if kind == 'above_avg' else '<'} (SELECT AVG({bare}) FROM {col.table})", False
    if kind in ("gt", "lt"):
        v = rng.choice(col.values)
        word = {"gt": ("above", "after"), "lt": ("below", "before")}[kind][col.one == "publication year"]
        phrase = f" published {word} {v}" if col.one == "publication year" else f" with an amount {word} {v}"
        return phrase, f"{col.sql} {'>' if kind == 'gt' else '<'} {v}", False
    if kind == "between":
        a, b = sorted(rng.sample(col.values, 2))
        phrase = (f" published between {a} and {b} inclusive" if col.one == "publication year"
                  else f" with an amount between {a} and {b} inclusive")
        return phrase, f"{col.sql} BETWEEN {a} AND {b}", False
    words, days = rng.choice(WINDOWS)
    return f" {words}", f"{col.sql} >= date('now', '{days}')", True


def _measure(kind: str, col: Col | None, rows: str, row: str, tail: str, rng: random.Random) -> tuple[str, str]:
    """(question, SELECT expression) for what to compute over `rows` + the filters' words `tail`."""
    if kind == "count":
        # "how many" as well: with it only in the distinct count's words, SFT answered the templates' "how many
        # calls user N made" with COUNT(DISTINCT ...)
        return rng.choice((f"count the {rows}{tail}", f"get the number of {rows}{tail}",
                           f"find how many {rows}{tail} there are")), "COUNT(*)"
    if kind == "count_distinct":
        return (rng.choice((f"count the distinct {col.many} among the {rows}{tail}",
                            f"know how many different {col.many} the {rows}{tail} have")),
                f"COUNT(DISTINCT {col.sql})")
    if kind in ("sum", "avg"):
        word = {"sum": "total", "avg": "average"}[kind]
        return f"compute the {word} {col.one} of the {rows}{tail}", f"{kind.upper()}({col.sql})"
    if kind in ("min", "max"):
        word = col.low if kind == "min" else col.high
        question = (f"find the time of the {word} {row}{tail}" if col.kind == "time"
                    else f"find the {word} {col.one} of the {rows}{tail}")
        return question, f"{kind.upper()}({col.sql})"
    return f"list the different {col.many} of the {rows}{tail}", f"DISTINCT {col.sql}"


@dataclass(frozen=True)
class Question:
    text: str
    sql: str
    dated: bool  # relative dates: the prompt states today's date
    ranking_sql: str | None = None  # for a top k: every group with its count, most first (to refuse ties)
    k: int = 0
    weaker: tuple[str, ...] = ()  # the query without each of its conditions (and its HAVING): all must differ
    grouped: bool = False


def _query(select: str, from_sql: str, conditions: list[str], tail: str = "") -> str:
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    return f"SELECT {select} FROM {from_sql}{where}{tail}"


def _without_each(select: str, from_sql: str, conditions: list[str], tail: str) -> tuple[str, ...]:
    return tuple(_query(select, from_sql, conditions[:i] + conditions[i + 1:], tail) + ";"
                 for i in range(len(conditions)))


def compose(shape: Shape, rng: random.Random) -> Question:
    """The question and its gold SQL for one draw of values."""
    src = shape.source
    phrases, conditions, dated = [], [], False
    for kind, col in shape.filters:
        phrase, condition, is_dated = _filter(kind, col, rng)
        phrases.append(phrase)
        conditions.append(condition)
        dated |= is_dated
    words = "".join(phrases)
    group, gcol = shape.group
    if group == "top":
        k = rng.choice((1, 3))
        question = (f"find the {gcol.one} with the most {src.rows}{words}" if k == 1
                    else f"list the {k} {gcol.many} with the most {src.rows}{words}")
        tail = f" GROUP BY {gcol.sql} ORDER BY COUNT(*) DESC"
        return Question(question, _query(gcol.sql, src.from_sql, conditions, f"{tail} LIMIT {k}") + ";", dated,
                        _query(f"{gcol.sql}, COUNT(*)", src.from_sql, conditions, tail) + ";", k,
                        _without_each(gcol.sql, src.from_sql, conditions, f"{tail} LIMIT {k}"), grouped=True)
    question, select = _measure(shape.measure[0], shape.measure[1], src.rows, src.row, words, rng)
    if group == "none":
        order = ""
        if shape.measure[0] == "list" and rng.random() < 0.5:  # the templates ask for ordered lists too: both kinds
            col = shape.measure[1]
            question += ", in alphabetical order" if col.kind == "category" else ", from smallest to largest"
            order = f" ORDER BY {col.sql}"
        return Question(question, _query(select, src.from_sql, conditions, order) + ";", dated,
                        weaker=_without_each(select, src.from_sql, conditions, order))
    per = rng.choice((f" per {gcol.one}", f" for each {gcol.one}"))
    select, tail = f"{gcol.sql}, {select}", f" GROUP BY {gcol.sql}"
    if group == "having":
        n = rng.choice((2, 5, 10, 20))
        having = f" HAVING COUNT(*) > {n}"
        return Question(f"{question}{per}, keeping only the {gcol.many} with more than {n} {src.rows}",
                        _query(select, src.from_sql, conditions, tail + having) + ";", dated,
                        weaker=(_query(select, src.from_sql, conditions, tail) + ";",
                                *_without_each(select, src.from_sql, conditions, tail + having)), grouped=True)
    return Question(question + per, _query(select, src.from_sql, conditions, tail) + ";", dated,
                    weaker=_without_each(select, src.from_sql, conditions, tail), grouped=True)


# ----------------------------------------------------------------------------------------------- the hand templates
_LITERALS = re.compile(r"'[^']*'|\b\d+\b")


def skeleton(sql: str) -> str:
    """The SQL with every literal replaced by ?: two queries of one shape (values aside) share it."""
    return _LITERALS.sub("?", sql)


@cache
def _template_skeletons() -> frozenset[str]:
    return frozenset(skeleton(re.sub(r"\{\w+\}", "0", t.sql)) for t in TEMPLATES)


def seen_skeleton(sql: str) -> bool:
    """True when a hand-written template of data/text2sql.py already asks this shape."""
    return skeleton(sql) in _template_skeletons()


def _pinned(sql: str) -> str:
    return sql.replace("'now'", f"'{REFERENCE_DATE}'")


def _usable(question: Question, conn) -> bool:
    """A result the question's every part decides: not empty, not a lone 0/NULL, two groups or more when grouped,
    different from the query without any one of its conditions or its HAVING (else that part of the question
    changes nothing, and a model that ignores it scores anyway), and for a top k no tie among the first k + 1
    (the answer must be one set in one order)."""
    def rows(sql: str) -> list[tuple]:
        return conn.execute(_pinned(sql)).fetchall()

    result = rows(question.sql)
    if not result or result in ([(0,)], [(None,)]) or (question.grouped and len(result) < 2 and not question.k):
        return False
    ordered = question.k > 0
    if any((rows(sql) == result) if ordered else (sorted(map(repr, rows(sql))) == sorted(map(repr, result)))
           for sql in question.weaker):
        return False
    if question.ranking_sql:
        counts = [count for _, count in rows(question.ranking_sql)]
        return len(counts) > question.k and len(set(counts[:question.k + 1])) == question.k + 1
    return True


def _share(key: str) -> float:
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def build_shape_rows(split: str) -> list[dict]:
    """The questions of the shapes in `split` (prompt, gold_sql, db_id, shape, draw): the first
    QUESTIONS_PER_SHAPE usable draws of each (`_usable`), leaving out the templates' shapes, then SPLIT_SIZES of
    them. Same output on every machine."""
    dbs, rows, seen = {}, [], set()
    for shape in all_shapes():
        if shape_split(shape.key) != split:
            continue
        rng = random.Random(f"text2sql-shapes:{shape.key}")
        conn = dbs.setdefault(shape.source.db_id, build_database(shape.source.db_id))
        kept = 0
        for _ in range(DRAWS_PER_SHAPE):
            question = compose(shape, rng)
            if question.sql in seen or seen_skeleton(question.sql) or not _usable(question, conn):
                continue
            seen.add(question.sql)
            rows.append({"prompt": text2sql_prompt(shape.source.db_id, question.text + ".", question.dated),
                         "gold_sql": question.sql, "db_id": shape.source.db_id, "shape": shape.key, "draw": kept})
            kept += 1
            if kept == QUESTIONS_PER_SHAPE[split]:
                break
    rows.sort(key=lambda r: hashlib.sha1(r["gold_sql"].encode()).hexdigest())
    return rows[:SPLIT_SIZES[split]] if split in SPLIT_SIZES else rows


def build_shape_tables() -> dict[str, list[dict]]:
    """The four text2sql_shapes_* tables: SFT demonstrations (prompt/completion), RL prompts, validation and
    held-out prompts (prompt, gold_sql, db_id, shape)."""
    def prompt_row(row: dict) -> dict:
        return {k: row[k] for k in ("prompt", "gold_sql", "db_id", "shape")}

    train = build_shape_rows("train")
    sft = [{"prompt": r["prompt"], "completion": [{"role": "assistant", "content": r["gold_sql"]}]}
           for r in train if r["draw"] == 0 and _share("sft:" + r["shape"]) < SFT_SHAPE_SHARE]
    return {"text2sql_shapes_sft": sft[:TRAIN_SIZES["text2sql_shapes_sft"]],
            "text2sql_shapes_prompts": [prompt_row(r) for r in train if r["draw"] == 1][
                :TRAIN_SIZES["text2sql_shapes_prompts"]],
            "text2sql_shapes_validation": [prompt_row(r) for r in build_shape_rows("validation")],
            "text2sql_shapes_heldout": [prompt_row(r) for r in build_shape_rows("heldout")]}


def write_shape_files(out_dir: str | Path = BUNDLED_DIR) -> dict[str, int]:
    """(Re)generate the text2sql_shapes_*.jsonl files; returns rows per file. Committed; a test checks they match."""
    return write_jsonl_tables(build_shape_tables(), out_dir)
