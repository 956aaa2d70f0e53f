"""The text-to-SQL task: bundled data match their generator, and the execution reward is right on right answers,
wrong on wrong ones, and safe (reward 0, no exception, no hang, no side effect) on hostile SQL."""

import json
import time

import pytest

from lowrank_rlhf.data import load_prompts, load_sft
from lowrank_rlhf.data.tables import BUNDLED_DIR
from lowrank_rlhf.data.text2sql import (
    REFERENCE_DATE,
    SCHEMAS,
    TEXT2SQL_FILES,
    build_database,
    build_text2sql_rows,
    write_text2sql_files,
)
from lowrank_rlhf.rewards import RewardFunctionError, call_reward_function, sql_execution, sql_runs
from lowrank_rlhf.rewards.sql import execute_sql, extract_sql

LOGIN_WEEK = ("SELECT COUNT(DISTINCT user_id) FROM events WHERE rpc_method = 'Login' AND "
              "timestamp >= date('now', '-7 days');")


def score(completion, gold=LOGIN_WEEK, db="events"):
    return sql_execution([""], [completion], gold_sql=[gold], db_id=[db])[0]


# ------------------------------------------------------------------------------------------------------------ data
def test_bundled_files_match_the_generator(tmp_path):
    counts = write_text2sql_files(tmp_path)
    for stem in TEXT2SQL_FILES:
        assert (tmp_path / f"{stem}.jsonl").read_text() == (BUNDLED_DIR / f"{stem}.jsonl").read_text(), \
            f"{stem}.jsonl is stale: run python -c 'from lowrank_rlhf.data.text2sql import write_text2sql_files; " \
            f"write_text2sql_files()'"
    assert 6 * counts["text2sql_sft"] == counts["text2sql_prompts"] and counts["text2sql_sft"] > 2 * \
        counts["text2sql_heldout"] > 100 and counts["text2sql_sft"] > 2 * counts["text2sql_validation"] > 100


def test_events_is_the_articles_table_and_rows_predate_the_reference_date():
    conn = build_database("events")
    assert [r[1] for r in conn.execute("PRAGMA table_info(events)")] == ["event_id", "timestamp", "user_id",
                                                                         "rpc_method"]
    assert conn.execute("SELECT MAX(timestamp) FROM events").fetchone()[0] < REFERENCE_DATE
    assert set(SCHEMAS) == {"events", "shop", "library"}


def test_prompt_form_columns_and_split():
    held = load_prompts("bundled:text2sql_heldout", name="data.eval_prompts")
    train = load_prompts("bundled:text2sql_prompts")
    sft = load_sft("bundled:text2sql_sft")
    assert held.column_names == train.column_names == ["prompt", "gold_sql", "db_id"]
    assert sft.column_names == ["prompt", "completion"]
    text = next(p[0]["content"] for p, sql in zip(train["prompt"], train["gold_sql"]) if "'Login'" in sql
                and "COUNT(DISTINCT" in sql)
    lines = text.splitlines()
    assert lines[0] == "-- We have a table `events` with columns `event_id`, `timestamp`, `user_id`, `rpc_method`."
    assert lines[1] == f"-- Today is {REFERENCE_DATE}." and lines[-1] == "-- SQL query for this is:"
    # held-out: no question text and no (gold SQL) value combination seen in training
    questions = lambda rows: {p[0]["content"] for p in rows["prompt"]}  # noqa: E731
    assert not questions(held) & questions(train)
    assert not set(held["gold_sql"]) & set(train["gold_sql"])
    assert set(held["db_id"]) == set(SCHEMAS)
    # SFT shows one phrasing with its answer, RL asks the same queries in six other phrasings, answers unseen
    assert sorted(6 * [c[0]["content"] for c in sft["completion"]]) == sorted(train["gold_sql"])
    assert len(questions(train)) == len(train)
    # validation: training queries (choosing on it reveals no held-out answer) in a phrasing no other table uses
    validation = load_prompts("bundled:text2sql_validation")
    assert not questions(validation) & (questions(train) | questions(held) | questions(sft))
    assert set(validation["gold_sql"]) < set(train["gold_sql"]) and set(validation["db_id"]) == set(SCHEMAS)
    assert len(questions(train)) == len(train)
    assert not questions(sft) & questions(train) and not questions(sft) & questions(held)
    for sql, db in zip(held["gold_sql"], held["db_id"]):
        assert score(sql, sql, db) == 1.0


def test_rows_are_deterministic():
    assert build_text2sql_rows() == build_text2sql_rows()


def test_the_nullable_coupon_column_left_every_other_order_column_as_it_was():
    """orders.coupon (NULL handling, 2026-12-05) draws from its own RNG: the other columns are the rows every
    earlier measurement answered about (this digest is theirs, taken before the column existed)."""
    import hashlib

    from lowrank_rlhf.data.text2sql import _rows

    orders = _rows("shop")["orders"]
    assert hashlib.sha256(repr([row[:5] for row in orders]).encode()).hexdigest() == \
        "3dfa96431a02b90474d0b1b451a3a8e099e4dae32fa09a2c398dd75a6b5673ab"
    coupons = [row[5] for row in orders]
    assert None in coupons and len(set(coupons)) > 2  # NULL and several coupons: IS NULL questions have answers


# ------------------------------------------------------------------------------------------------ right and wrong
@pytest.mark.parametrize("completion", [
    LOGIN_WEEK,
    "```sql\nSELECT COUNT(DISTINCT user_id)\nFROM events\nWHERE rpc_method = 'Login'\n  AND timestamp >= "
    "'2024-03-08'\n```\nThis counts the users.",
    "select count(distinct e.user_id) from events e where e.rpc_method='Login' and e.timestamp >= "
    "datetime(CURRENT_TIMESTAMP, '-7 days')",
    LOGIN_WEEK + "\nThis query counts distinct users.",
    "SELECT COUNT(DISTINCT user_id) FROM events WHERE rpc_method = 'Login' AND timestamp >= date('now', '-7 days')"
    "\n\nExplanation: we filter by method.",
])
def test_correct_answers_score_one(completion):
    assert score(completion) == 1.0


@pytest.mark.parametrize("completion", [
    "SELECT COUNT(user_id) FROM events WHERE rpc_method = 'Login' AND timestamp >= date('now', '-7 days');",
    "SELECT COUNT(DISTINCT user_id) FROM events WHERE rpc_method = 'Login';",
    "SELECT COUNT(DISTINCT user_id) FROM events WHERE rpc_method = 'login' AND timestamp >= date('now','-7 days');",
    "I think you should count the users.",
    "",
    "SELECT COUNT(DISTINCT user_id) FROM event;",
])
def test_wrong_answers_score_zero(completion):
    assert score(completion) == 0.0


def test_ordering_counts_only_when_the_gold_orders():
    ordered = "SELECT DISTINCT rpc_method FROM events WHERE user_id = 3 ORDER BY rpc_method;"
    assert score(ordered, ordered) == 1.0
    assert score(ordered.replace("ORDER BY rpc_method", "ORDER BY rpc_method DESC"), ordered) == 0.0
    unordered = "SELECT rpc_method, COUNT(*) FROM events GROUP BY rpc_method;"
    assert score("SELECT rpc_method, COUNT(*) FROM events GROUP BY rpc_method ORDER BY COUNT(*) DESC;",
                 unordered) == 1.0
    assert score("SELECT COUNT(*), rpc_method FROM events GROUP BY rpc_method;", unordered) == 0.0  # columns
    # multisets: a duplicate row more or less is wrong
    assert score("SELECT user_id FROM events WHERE rpc_method = 'Search';",
                 "SELECT DISTINCT user_id FROM events WHERE rpc_method = 'Search';") == 0.0
    # ORDER BY inside a subquery does not make the outer result ordered
    sub = "SELECT user_id FROM (SELECT DISTINCT user_id FROM events ORDER BY user_id);"
    assert score("SELECT DISTINCT user_id FROM events ORDER BY user_id DESC;", sub) == 1.0


def test_joins_on_the_other_databases():
    gold = ("SELECT SUM(orders.amount) FROM orders JOIN customers ON orders.customer_id = customers.customer_id "
            "WHERE customers.city = 'Oslo';")
    alias = ("SELECT SUM(o.amount) FROM customers AS c, orders AS o WHERE o.customer_id = c.customer_id AND "
             "c.city = 'Oslo'")
    assert score(alias, gold, "shop") == 1.0
    assert score(alias.replace("Oslo", "Berlin"), gold, "shop") == 0.0


# ----------------------------------------------------------------------------------------------------------- hostile
HOSTILE = {
    "drop": "DROP TABLE events;",
    "delete": "DELETE FROM events;",
    "update": "UPDATE events SET user_id = 0;",
    "create": "CREATE TABLE t AS SELECT * FROM events;",
    "attach": "ATTACH '/etc/passwd' AS p;",
    "attach_select": "ATTACH DATABASE ':memory:' AS x; SELECT 1;",
    "pragma_write": "PRAGMA query_only = OFF;",
    "pragma_writable_schema": "PRAGMA writable_schema = 1;",
    "load_extension": "SELECT load_extension('/usr/lib/x86_64-linux-gnu/libc.so.6');",
    "recursive": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT COUNT(*) FROM c;",
    "recursive_rows": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c;",
    "cartesian": "SELECT COUNT(*) FROM events a, events b, events c;",  # 64 million rows
    "cartesian_rows": "SELECT a.event_id FROM events a, events b;",  # 160 000 rows
    "zeroblob": "SELECT length(zeroblob(2000000000));",
    "huge_string": "SELECT length(replace(hex(zeroblob(600000)), '0', '00'));",  # 2.4 MB > SQLITE_LIMIT_LENGTH
    "begin": "BEGIN IMMEDIATE;",
    "vacuum": "VACUUM INTO '/tmp/lowrank_rlhf_sql_test.db';",
    "nul": "SELECT 1\x00; DROP TABLE events;",
    "surrogate": "SELECT '\udcff';",
    "non_utf8_bytes": b"SELECT '\xff\xfe';",
    "not_a_string": 12345,
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_sql_scores_zero_quickly_and_changes_nothing(name):
    started = time.monotonic()
    assert score(HOSTILE[name]) == 0.0
    assert sql_runs([""], [HOSTILE[name]], db_id=["events"]) == [0.0]
    assert time.monotonic() - started < 10
    # the next answer sees the database intact
    assert execute_sql("SELECT COUNT(*) FROM events;", "events") == [(400,)]


def test_multiple_statements_run_only_the_first():
    assert extract_sql("SELECT 1; DROP TABLE events;") == "SELECT 1;"
    assert extract_sql("SELECT ';' AS x; DROP TABLE events") == "SELECT ';' AS x;"
    assert extract_sql("SELECT 1 -- ; DROP\n;") == "SELECT 1 -- ; DROP\n;"
    assert score(LOGIN_WEEK + " DROP TABLE events;") == 1.0
    assert execute_sql("SELECT COUNT(*) FROM events;", "events") == [(400,)]


def test_the_row_limit_and_read_only_pragmas():
    assert len(execute_sql("SELECT * FROM events;", "events")) == 400
    with pytest.raises(Exception, match="more than 100 rows"):
        execute_sql("SELECT * FROM events;", "events", max_rows=100)
    assert [r[1] for r in execute_sql("PRAGMA table_info(events);", "events")][:2] == ["event_id", "timestamp"]


def test_an_sqlite_file_as_database(tmp_path):
    path = tmp_path / "mine.sqlite"
    conn = __import__("sqlite3").connect(path)
    conn.executescript("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1), (2);")
    conn.commit()
    conn.close()
    assert score("SELECT SUM(x) FROM t", "SELECT 3;", str(path)) == 1.0
    assert score("DELETE FROM t;", "SELECT 3;", str(path)) == 0.0
    assert score("SELECT 1", "SELECT 1", str(tmp_path / "missing.sqlite")) == 0.0


def test_through_call_reward_function_with_dataset_columns():
    held = load_prompts("bundled:text2sql_heldout")
    gold, dbs = held["gold_sql"][:4], held["db_id"][:4]
    scores = call_reward_function(sql_execution, ["p"] * 4, [[{"role": "assistant", "content": g}] for g in gold],
                                  name="sql_execution", gold_sql=gold, db_id=dbs, label=[0] * 4)
    assert scores.tolist() == [1.0] * 4
    with pytest.raises(RewardFunctionError, match="needs columns gold_sql and db_id"):
        call_reward_function(sql_execution, ["p"], ["SELECT 1"], name="sql_execution")
    assert json.dumps(scores.tolist())


def test_every_bundled_question_maps_back_to_its_template():
    """template_of (per-template accuracy in scripts/text2sql_breakdown.py) finds the generating template for every
    value combination, and nothing for SQL no template wrote."""
    from lowrank_rlhf.data.text2sql import TEMPLATES, build_text2sql_rows, template_of

    for n, template in enumerate(TEMPLATES):
        for values in template.values:
            assert template_of(template.sql.format(**values)) == n, (n, values)
    rows = build_text2sql_rows()
    assert all(template_of(r["gold_sql"]) is not None for r in rows["text2sql_prompts"] + rows["text2sql_heldout"])
    assert template_of("SELECT COUNT(*) FROM events;") is None
    assert template_of(TEMPLATES[3].sql.format(u=7) + " LIMIT 1") is None


def test_partial_credit_tells_a_near_miss_from_a_far_one():
    from lowrank_rlhf.rewards import sql_columns, sql_row_count, sql_tables

    gold = "SELECT DISTINCT user_id FROM events WHERE rpc_method = 'Search';"
    answers = [
        gold,                                                          # right
        "SELECT DISTINCT user_id FROM events;",                        # right table and width, too many rows
        "SELECT user_id, rpc_method FROM events WHERE rpc_method = 'Search';",  # a column too many
        "SELECT COUNT(*) FROM events WHERE rpc_method = 'Search';",   # one row of one column
        "SELECT DISTINCT user_id FROM evnts;",                         # does not run
        "Count the users.",                                            # no SQL
    ]

    def terms(fn):
        return fn([""] * len(answers), answers, gold_sql=[gold] * len(answers), db_id=["events"] * len(answers))

    columns, rows, tables = terms(sql_columns), terms(sql_row_count), terms(sql_tables)
    execution = terms(sql_execution)
    assert execution == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert columns == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    assert rows[0] == 1.0 and 0 < rows[1] < 1 and rows[4] == rows[5] == 0.0
    assert tables == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    near, far = (columns[1] + rows[1] + tables[1]), (columns[4] + rows[4] + tables[4])
    assert near > far  # signal where the 0/1 match gives none
    with pytest.raises(RewardFunctionError, match="sql_row_count needs columns gold_sql and db_id"):
        sql_row_count(["q"], ["SELECT 1"])
