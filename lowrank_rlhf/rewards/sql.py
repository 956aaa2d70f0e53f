"""Execution reward for text-to-SQL: run the completion's SQL on a private in-memory copy of the prompt's database
and compare its result with the gold query's. Re-exported as `lowrank_rlhf.rewards:sql_execution` (1.0 / 0.0) and
`lowrank_rlhf.rewards:sql_runs` (1.0 for one SELECT that runs, right or not: a small format credit to weight in).

The SQL comes from a policy being optimised against this very function, so it is treated as hostile:

- each answer gets its own in-memory copy of the database (deserialized bytes), never a file;
- an authorizer allows only reading (SELECT, reading columns, functions, recursive CTEs, a few schema PRAGMAs)
  and denies everything else: ATTACH, writes, DDL, transactions, PRAGMA writes, load_extension;
- extension loading stays off, and SQLite's own limits cap string/blob sizes and statement length;
- a progress handler stops a query after MAX_STEPS virtual-machine steps or MAX_SECONDS (infinite WITH RECURSIVE,
  a cartesian join of a million rows), and more than MAX_ROWS result rows is a wrong answer;
- only the first statement runs; any error of any kind is reward 0.0, never an exception.

Rows compare as multisets (column order matters, column names do not), in order only when the gold query ends
with ORDER BY. Floats compare after rounding to 6 places (SUM over different join orders).
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..data.chat import completion_text
from ..data.text2sql import REFERENCE_DATE, SCHEMAS, build_database
from .errors import RewardFunctionError

__all__ = ["execute_sql", "extract_sql", "results_match", "sql_execution", "sql_runs"]

MAX_STEPS = 5_000_000  # SQLite VM instructions per query: the gold queries need < 100k
MAX_SECONDS = 2.0
MAX_ROWS = 10_000
PROGRESS_EVERY = 1_000  # VM instructions between progress-handler calls
MAX_SQL_CHARS = 4_000

_READ_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
_READ_PRAGMAS = {"table_info", "table_xinfo", "table_list", "index_list", "index_info", "foreign_key_list"}
# load_extension is off at the connection level too; the rest exist only in some builds (shell/fileio extensions)
_DENIED_FUNCTIONS = {"load_extension", "readfile", "writefile", "edit", "fts3_tokenizer", "sqlite_dbpage"}
_FENCE = re.compile(r"```[ \t]*(?:sql|sqlite)?[ \t]*\n?(.*?)(?:```|$)", re.IGNORECASE | re.DOTALL)
# SQLite's clock is the machine's; the task's "today" is REFERENCE_DATE (data/text2sql.py)
_NOW = re.compile(r"'now'|\bCURRENT_TIMESTAMP\b|\bCURRENT_DATE\b", re.IGNORECASE)


class SQLRejected(Exception):
    """The SQL was refused, failed or ran too long: reward 0."""


# ------------------------------------------------------------------------------------------------------ extraction
def _first_statement(text: str) -> str:
    """Text up to and including the first ';' outside quotes and comments; all of it when there is none."""
    quote = None
    i = 0
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"`[":
            quote = "]" if ch == "[" else ch
        elif text.startswith("--", i):
            end = text.find("\n", i)
            i = len(text) if end < 0 else end
            continue
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = len(text) if end < 0 else end + 2
            continue
        elif ch == ";":
            return text[:i + 1]
        i += 1
    return text


def extract_sql(completion: Any) -> str:
    """The SQL in a completion: inside the first ``` fence if there is one, then up to the first ';' (statements
    after it never run); without a ';', up to the first blank line (a model's explanation usually follows one)."""
    if isinstance(completion, (bytes, bytearray)):
        completion = bytes(completion).decode("utf-8")  # strict: non-UTF-8 bytes -> UnicodeDecodeError -> 0
    text = completion_text(completion)
    fenced = _FENCE.search(text)
    if fenced:
        text = fenced.group(1)
    text = _first_statement(text.strip())
    if not text.endswith(";"):
        text = text.split("\n\n")[0]
    return text.strip()


# ------------------------------------------------------------------------------------------------------- execution
@lru_cache(maxsize=16)
def _image(db_id: str) -> bytes:
    """db_id (a bundled database or a path to an SQLite file) as bytes to deserialize: copies are cheap."""
    if db_id in SCHEMAS:
        conn = build_database(db_id)
    else:
        path = Path(db_id)
        if not path.is_file():
            raise SQLRejected(f"unknown database {db_id!r}; allowed values: {', '.join(SCHEMAS)} or an SQLite file")
        src = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        conn = sqlite3.connect(":memory:")
        src.backup(conn)
        src.close()
    try:
        return conn.serialize()
    finally:
        conn.close()


def _authorize(action: int, arg1, arg2, db_name, trigger) -> int:
    if action == sqlite3.SQLITE_FUNCTION and str(arg2).lower() in _DENIED_FUNCTIONS:
        return sqlite3.SQLITE_DENY
    if action in _READ_ACTIONS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA and str(arg1).lower() in _READ_PRAGMAS:
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


def _sandbox(db_id: str) -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    conn.deserialize(_image(db_id))
    if hasattr(conn, "enable_load_extension"):  # absent where Python was built without extension loading
        conn.enable_load_extension(False)
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 1_000_000)  # no gigabyte zeroblob()/printf() strings
    conn.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, MAX_SQL_CHARS * 4)
    conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
    conn.execute("PRAGMA query_only = ON")  # before the authorizer, which would deny this write
    conn.set_authorizer(_authorize)
    return conn


def execute_sql(sql: str, db_id: str, max_rows: int = MAX_ROWS, max_steps: int = MAX_STEPS,
                max_seconds: float = MAX_SECONDS) -> list[tuple]:
    """The rows of one read-only query on a fresh copy of db_id; SQLRejected on anything else."""
    if not sql or len(sql) > MAX_SQL_CHARS:
        raise SQLRejected("empty or too long")
    if not sqlite3.complete_statement(sql if sql.endswith(";") else sql + ";"):
        raise SQLRejected("incomplete statement")
    sql = _NOW.sub(f"'{REFERENCE_DATE}'", sql)
    conn = _sandbox(db_id)
    calls, deadline = [0], time.monotonic() + max_seconds

    def progress() -> int:  # non-zero interrupts the query (OperationalError: interrupted)
        calls[0] += 1
        return int(calls[0] * PROGRESS_EVERY > max_steps or time.monotonic() > deadline)

    conn.set_progress_handler(progress, PROGRESS_EVERY)
    try:
        cursor = conn.execute(sql)  # one statement only: sqlite3 refuses a second
        rows = cursor.fetchmany(max_rows + 1)
        if len(rows) > max_rows:
            raise SQLRejected(f"more than {max_rows} rows")
        return rows
    except SQLRejected:
        raise
    except Exception as err:  # sqlite3 errors, UnicodeEncodeError (lone surrogates), ValueError (NUL), MemoryError
        raise SQLRejected(f"{type(err).__name__}: {err}") from None
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------------------ comparison
def _ordered(gold_sql: str) -> bool:
    """Whether the gold query's outermost SELECT ends with ORDER BY (one inside a subquery does not count)."""
    depth, outer = 0, []
    for ch in gold_sql:
        depth += (ch == "(") - (ch == ")")
        outer.append(ch if depth == 0 else " ")
    return re.search(r"\bORDER\s+BY\b", "".join(outer), re.IGNORECASE) is not None


def _norm(row: tuple) -> tuple:
    return tuple(round(v, 6) if isinstance(v, float) else v for v in row)


def results_match(got: list[tuple], gold: list[tuple], ordered: bool) -> bool:
    got, gold = [_norm(r) for r in got], [_norm(r) for r in gold]
    return got == gold if ordered else Counter(got) == Counter(gold)


@lru_cache(maxsize=4096)
def _gold(gold_sql: str, db_id: str) -> tuple[list[tuple], bool]:
    return execute_sql(gold_sql, db_id), _ordered(gold_sql)


def _score(completion: Any, gold_sql: str, db_id: str) -> tuple[bool, bool]:
    """(runs, correct) for one completion; never raises."""
    try:
        rows = execute_sql(extract_sql(completion), str(db_id))
    except Exception:  # SQLRejected, and anything extraction raises on odd input
        return False, False
    try:
        gold, ordered = _gold(str(gold_sql), str(db_id))
    except SQLRejected:
        return True, False  # a gold query that fails is the data's fault; no completion can match it
    return True, results_match(rows, gold, ordered)


def _columns(name: str, values: Sequence | None, n: int) -> Sequence:
    if values is None or len(values) != n:

        got = "none" if values is None else f"{len(values)} values"
        raise RewardFunctionError(f"reward function {name} needs columns gold_sql and db_id in data.prompts, one "
                                  f"value per completion ({n}); got {got}")
    return values


def sql_execution(prompts: Sequence[str], completions: Sequence[Any], gold_sql: Sequence[str] | None = None,
                  db_id: Sequence[str] | None = None, **kwargs: Any) -> list[float]:
    """1.0 when the completion's SQL returns the gold query's rows on the prompt's database, else 0.0."""
    n = len(completions)
    gold, dbs = _columns("sql_execution", gold_sql, n), _columns("sql_execution", db_id, n)
    return [float(_score(c, g, d)[1]) for c, g, d in zip(completions, gold, dbs)]


def sql_runs(prompts: Sequence[str], completions: Sequence[Any], gold_sql: Sequence[str] | None = None,
             db_id: Sequence[str] | None = None, **kwargs: Any) -> list[float]:
    """1.0 when the completion is one read-only query that runs on the prompt's database (right or wrong)."""
    n = len(completions)
    dbs = _columns("sql_runs", db_id, n)
    return [float(_score(c, "SELECT 1", d)[0]) for c, d in zip(completions, dbs)]


# ---------------------------------------------------------------------------------------------- partial credit
# Where a 0/1 execution match gives no signal (no sample of a question is right), these terms tell a nearer miss
# from a farther one. Each is a reward function of its own, so each is reported on its own in the RL metrics
# (rewards.functions with rewards.function_weights sums them); sql_execution stays the held-out metric.
_TABLE = re.compile(r"\b(?:FROM|JOIN)\s+([A-Za-z_][A-Za-z0-9_]*)", re.IGNORECASE)


def _tables(sql: str) -> set[str]:
    return {name.lower() for name in _TABLE.findall(sql)}


def _result(completion: Any, gold_sql: str, db_id: str) -> tuple[list[tuple] | None, list[tuple] | None]:
    """(the completion's rows or None when it does not run, the gold rows or None when the gold fails)."""
    try:
        rows = execute_sql(extract_sql(completion), str(db_id))
    except Exception:  # SQLRejected, and anything extraction raises on odd input
        rows = None
    try:
        gold = _gold(str(gold_sql), str(db_id))[0]
    except SQLRejected:
        gold = None
    return rows, gold


def _partial(name: str, term, completions, gold_sql, db_id) -> list[float]:
    n = len(completions)
    gold, dbs = _columns(name, gold_sql, n), _columns(name, db_id, n)
    scores = []
    for completion, g, d in zip(completions, gold, dbs):
        rows, expected = _result(completion, g, d)
        scores.append(0.0 if rows is None or expected is None else float(term(rows, expected, completion, g)))
    return scores


def sql_columns(prompts: Sequence[str], completions: Sequence[Any], gold_sql: Sequence[str] | None = None,
                db_id: Sequence[str] | None = None, **kwargs: Any) -> list[float]:
    """1.0 when the completion's query runs and returns as many columns as the gold query, else 0.0."""
    def term(rows, gold, completion, gold_sql):
        width = {len(r) for r in rows} or {None}
        return width == ({len(r) for r in gold} or {None}) if rows or gold else True
    return _partial("sql_columns", term, completions, gold_sql, db_id)


def sql_row_count(prompts: Sequence[str], completions: Sequence[Any], gold_sql: Sequence[str] | None = None,
                  db_id: Sequence[str] | None = None, **kwargs: Any) -> list[float]:
    """How near the number of rows is to the gold's: (smaller + 1) / (larger + 1); 1.0 when equal, 0.0 when the
    query does not run."""
    def term(rows, gold, completion, gold_sql):
        small, large = sorted((len(rows), len(gold)))
        return (small + 1) / (large + 1)
    return _partial("sql_row_count", term, completions, gold_sql, db_id)


def sql_tables(prompts: Sequence[str], completions: Sequence[Any], gold_sql: Sequence[str] | None = None,
               db_id: Sequence[str] | None = None, **kwargs: Any) -> list[float]:
    """Jaccard overlap of the tables the query reads (FROM/JOIN) with the gold query's, when the query runs."""
    def term(rows, gold, completion, gold_sql):
        mine, theirs = _tables(extract_sql(completion)), _tables(gold_sql)
        return len(mine & theirs) / len(mine | theirs) if mine | theirs else 1.0
    return _partial("sql_tables", term, completions, gold_sql, db_id)
