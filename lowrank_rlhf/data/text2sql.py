"""The bundled text-to-SQL task: small SQLite databases built by code, questions with gold SQL, and the four
committed tables derived from them by `write_text2sql_files` (a test checks the files match this module).

Databases (`db_id`): `events` is the seed article's table exactly (event_id, timestamp, user_id, rpc_method);
`shop` (customers, orders) and `library` (authors, books) give joins. Rows come from a seeded RNG, so the same
code always builds the same database; `database_script(db_id)` is that database as SQL.

Dates: every timestamp lies before REFERENCE_DATE, and the prompt states it ("-- Today is ..."). The reward pins
SQLite's 'now' to it as well (sql_reward.py), so "the last week" means the same rows in every year.

Split: each question template has eight phrasings. SFT's one comes with the gold SQL; six are the RL prompts'
(question only; the reward runs the model's SQL against the gold query's result, so RL learns from phrasings it was
never shown an answer for: prompts without answers are cheap, which is what RL with a verifiable reward is for); one
is the validation set's, on which RL chooses its best policy (RUN/best) without looking at the held-out questions;
the last is held out. Value combinations (method x window, city, ...) are split by a hash as well, so a held-out
question pairs an unseen phrasing with values training never asked about together; validation questions use
training values (a third of them), so choosing on them says nothing about the held-out answers.
"""

from __future__ import annotations

import hashlib
import random
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from itertools import product
from pathlib import Path

from .errors import DataError
from .tables import BUNDLED_DIR, write_jsonl_tables

REFERENCE_DATE = "2024-03-15"  # "today" for every question; all rows are older
TEXT2SQL_FILES = ("text2sql_sft", "text2sql_prompts", "text2sql_validation", "text2sql_heldout")
HELDOUT_SHARE = 0.25  # of each template's value combinations
VALIDATION_SHARE = 1 / 3  # of the training combinations: as many validation as held-out questions, so evals cost alike

SCHEMAS = {  # db_id -> {table: [(column, type), ...]}, in prompt order
    "events": {"events": [("event_id", "INTEGER"), ("timestamp", "TEXT"), ("user_id", "INTEGER"),
                          ("rpc_method", "TEXT")]},
    "shop": {"customers": [("customer_id", "INTEGER"), ("name", "TEXT"), ("city", "TEXT")],
             "orders": [("order_id", "INTEGER"), ("customer_id", "INTEGER"), ("order_date", "TEXT"),
                        ("amount", "INTEGER"), ("status", "TEXT"), ("coupon", "TEXT")]},
    "library": {"authors": [("author_id", "INTEGER"), ("name", "TEXT"), ("country", "TEXT")],
                "books": [("book_id", "INTEGER"), ("title", "TEXT"), ("author_id", "INTEGER"), ("year", "INTEGER"),
                          ("genre", "TEXT")]},
}
METHODS = ("Login", "Logout", "GetProfile", "UpdateProfile", "ListFiles", "UploadFile", "DeleteFile", "Search")
CITIES = ("Berlin", "Lisbon", "Oslo", "Madrid", "Vienna", "Dublin")
STATUSES = ("paid", "shipped", "cancelled", "refunded")
COUNTRIES = ("France", "Japan", "Brazil", "Canada", "Kenya", "Poland")
COUPONS = ("SPRING10", "WELCOME5", "VIP20")  # orders.coupon: NULL when the order used none (most do)
GENRES = ("mystery", "fantasy", "history", "poetry", "science")
WINDOWS = (("over the last week", "-7 days"), ("over the last 3 days", "-3 days"),
           ("over the last two weeks", "-14 days"), ("over the last 30 days", "-30 days"))


# ------------------------------------------------------------------------------------------------------ databases
def _rows(db_id: str) -> dict[str, list[tuple]]:
    rng = random.Random(f"text2sql:{db_id}")  # a string seed: stable across Python versions
    ref = datetime.fromisoformat(REFERENCE_DATE)

    def before(days: int) -> str:  # a moment within `days` days before the reference date, to the second
        return (ref - timedelta(seconds=rng.randrange(1, days * 86400))).strftime("%Y-%m-%d %H:%M:%S")

    if db_id == "events":
        weights = (6, 4, 3, 2, 3, 2, 1, 3)  # Login most common, DeleteFile rare: counts differ per method
        rows = [(i + 1, before(45), rng.randint(1, 40), rng.choices(METHODS, weights)[0]) for i in range(400)]
        rows.sort(key=lambda r: r[1])
        return {"events": [(i + 1, ts, user, method) for i, (_, ts, user, method) in enumerate(rows)]}
    if db_id == "shop":
        first = ("Ana", "Ben", "Chloe", "Dmitri", "Eva", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kaia", "Luca",
                 "Mira", "Nils", "Olga", "Pablo", "Quinn", "Rosa", "Sven", "Tara", "Uma", "Viktor", "Wen", "Yara")
        customers = [(i + 1, name, CITIES[i % len(CITIES)]) for i, name in enumerate(first)]
        orders = [(i + 1, rng.randint(1, len(first)), before(60)[:10], rng.randint(5, 300),
                   rng.choices(STATUSES, (6, 4, 2, 1))[0]) for i in range(150)]
        # the nullable column (NULL handling) draws from its own RNG, added 2026-12-05: the other columns, and so
        # every earlier question's answer, stay what they were
        coupon = random.Random("text2sql:shop:coupon")
        orders = [order + (coupon.choices((None,) + COUPONS, (11, 4, 3, 2))[0],) for order in orders]
        return {"customers": customers, "orders": orders}
    if db_id == "library":
        names = ("Amelie Roux", "Kenji Sato", "Lucas Prado", "Maya Tremblay", "Njeri Otieno", "Piotr Nowak",
                 "Claire Dubois", "Haruki Mori", "Bianca Lima", "Owen Gagnon", "Amani Wanjiru", "Zofia Lis")
        authors = [(i + 1, name, COUNTRIES[i % len(COUNTRIES)]) for i, name in enumerate(names)]
        words = ("River", "Shadow", "Garden", "Winter", "Glass", "Harbor", "Silent", "Iron", "Paper", "Golden",
                 "Hidden", "Northern")
        nouns = ("Clock", "Map", "Letters", "Tower", "Song", "Bridge", "Forest", "Island", "Archive", "Lantern")
        titles = sorted({f"The {a} {b}" for a, b in product(words, nouns)})
        rng.shuffle(titles)
        books = [(i + 1, titles[i], rng.randint(1, len(names)), rng.randint(1950, 2023), rng.choice(GENRES))
                 for i in range(90)]
        return {"authors": authors, "books": books}
    raise DataError(f"text2sql: unknown database {db_id!r}; allowed values: {', '.join(SCHEMAS)}")


def sql_literal(value) -> str:
    """A Python value as SQLite writes it: NULL, a quoted string (quotes doubled) or a number."""
    if value is None:
        return "NULL"
    return "'" + value.replace("'", "''") + "'" if isinstance(value, str) else str(value)


@cache
def database_script(db_id: str) -> str:
    """The database `db_id` as one SQL script (CREATE TABLE + INSERTs): what `build_database` runs."""
    if db_id not in SCHEMAS:
        raise DataError(f"text2sql: unknown database {db_id!r}; allowed values: {', '.join(SCHEMAS)}")
    lines = []
    for table, rows in _rows(db_id).items():
        columns = ", ".join(f"{name} {kind}" for name, kind in SCHEMAS[db_id][table])
        lines.append(f"CREATE TABLE {table} ({columns});")
        for row in rows:
            values = ", ".join(sql_literal(v) for v in row)
            lines.append(f"INSERT INTO {table} VALUES ({values});")
    return "\n".join(lines) + "\n"


def build_database(db_id: str) -> sqlite3.Connection:
    """A fresh in-memory SQLite database `db_id` (writable: the caller's own copy)."""
    conn = sqlite3.connect(":memory:")
    conn.executescript(database_script(db_id))
    return conn


# ----------------------------------------------------------------------------------------------------- questions
@dataclass(frozen=True)
class Template:
    db_id: str
    sft: str  # the one phrasing SFT shows, with the gold SQL
    rl: tuple[str, ...]  # the RL prompts' phrasings: asked, never answered
    validation: str  # chooses a policy during RL (RUN/best) without looking at the held-out questions
    held_out: str  # lowrank-rlhf eval's: never trained on, never used to choose
    sql: str  # str.format'ed with the same values as the phrasing
    values: tuple[dict, ...]  # one dict per value combination
    dated: bool = False  # relative dates: the prompt states today's date


def _combos(**axes) -> tuple[dict, ...]:
    keys = list(axes)
    return tuple(dict(zip(keys, vals)) for vals in product(*axes.values()))


def _windows(methods=METHODS) -> tuple[dict, ...]:
    return tuple({"m": m, "w": w, "d": d} for m, (w, d) in product(methods, WINDOWS))


# The first three RL phrasings of each template are those of 2026-11-29; the last three and the validation phrasing
# were added on 2026-12-05 (more phrasings per question: the README's next step for RL that generalises).
TEMPLATES = (
    Template("events", sft='count how many users issued request "{m}" {w}.',
             rl=('know the number of distinct users who called "{m}" {w}.',
                 'determine how many unique users made a "{m}" call {w}.',
                 'count the distinct user ids with a "{m}" request {w}.',
                 'see how many separate users used "{m}" {w}.',
                 'tell the number of unique users behind "{m}" calls {w}.',
                 'count the users, each once, who requested "{m}" {w}.'),
             validation='know how many distinct users requested "{m}" {w}.',
             held_out='find how many different users sent a "{m}" request {w}.',
             sql="SELECT COUNT(DISTINCT user_id) FROM events "
                 "WHERE rpc_method = '{m}' AND timestamp >= date('now', '{d}');",
             values=_windows(), dated=True),
    Template("events", sft='count the "{m}" requests {w}.',
             rl=('know how many times "{m}" was called {w}.',
                 'tally the "{m}" calls {w}.',
                 'know the count of "{m}" requests made {w}.',
                 'see how many "{m}" calls there were {w}.',
                 'tell how often "{m}" was requested {w}.',
                 'count all calls to "{m}" {w}.'),
             validation='compute how many "{m}" requests were made {w}.',
             held_out='get the number of "{m}" events {w}.',
             sql="SELECT COUNT(*) FROM events WHERE rpc_method = '{m}' AND timestamp >= date('now', '{d}');",
             values=_windows(), dated=True),
    Template("events", sft='list the users who issued request "{m}".',
             rl=('see which user ids called "{m}".',
                 'list each user id that has called "{m}" at least once.',
                 'show the unique users behind "{m}" requests.',
                 'get the ids of the users who made a "{m}" call.',
                 'know which users have requested "{m}".',
                 'show every user id with a "{m}" request.'),
             validation='list the different user ids that called "{m}".',
             held_out='find every distinct user that sent "{m}".',
             sql="SELECT DISTINCT user_id FROM events WHERE rpc_method = '{m}';", values=_combos(m=METHODS)),
    Template("events", sft="count how many requests user {u} issued.",
             rl=("know the number of events of user {u}.",
                 "count all events recorded for user {u}.",
                 "tell how many requests came from user {u}.",
                 "see how many calls user {u} has made.",
                 "get the request count of user {u}.",
                 "know how many times user {u} appears in the events."),
             validation="count the events of user {u}.",
             held_out="find how many calls user {u} made in total.",
             sql="SELECT COUNT(*) FROM events WHERE user_id = {u};", values=_combos(u=range(1, 41))),
    Template("events", sft="list the request types user {u} issued, in alphabetical order.",
             rl=("see which rpc methods user {u} called, sorted by name.",
                 "show the unique request types of user {u}, in alphabetical order.",
                 "list which methods user {u} has used, alphabetically.",
                 "know every rpc method user {u} called, from A to Z.",
                 "show the methods that user {u} requested, sorted alphabetically.",
                 "list the different rpc methods of user {u} in name order."),
             validation="see the request types of user {u}, sorted by name.",
             held_out="get the distinct methods used by user {u}, ordered alphabetically.",
             sql="SELECT DISTINCT rpc_method FROM events WHERE user_id = {u} ORDER BY rpc_method;",
             values=_combos(u=range(1, 41))),
    Template("events", sft="count the requests per rpc method {w}.",
             rl=("know how many events each request type had {w}.",
                 "show how many requests of each method were made {w}.",
                 "count events grouped by rpc method {w}.",
                 "tally the calls of each rpc method {w}.",
                 "see the request count for each method {w}.",
                 "know how often each method was called {w}."),
             validation="show the number of requests per method {w}.",
             held_out="get the number of calls for every method {w}.",
             sql="SELECT rpc_method, COUNT(*) FROM events WHERE timestamp >= date('now', '{d}') GROUP BY rpc_method;",
             values=tuple({"w": w, "d": d} for w, d in WINDOWS), dated=True),
    Template("shop", sft='count the orders with status "{s}".',
             rl=('know how many orders are "{s}".',
                 'tell how many orders have the status "{s}".',
                 'count all "{s}" orders.',
                 'see how many orders have status "{s}".',
                 'get the count of orders marked "{s}".',
                 'tally the orders whose status is "{s}".'),
             validation='know the number of orders in status "{s}".',
             held_out='find the number of "{s}" orders.',
             sql="SELECT COUNT(*) FROM orders WHERE status = '{s}';", values=_combos(s=STATUSES)),
    Template("shop", sft="get the total amount of orders placed by customers from {c}.",
             rl=("know how much customers in {c} spent in total.",
                 "compute the total order amount for customers based in {c}.",
                 "add up the amounts of orders from {c} customers.",
                 "see the combined amount of all orders by customers from {c}.",
                 "know the total value of the orders of customers in {c}.",
                 "compute how much was ordered in total by {c} customers."),
             validation="tell the total order amount of customers from {c}.",
             held_out="sum the order amounts of all customers living in {c}.",
             sql="SELECT SUM(orders.amount) FROM orders JOIN customers ON orders.customer_id = customers.customer_id "
                 "WHERE customers.city = '{c}';", values=_combos(c=CITIES)),
    Template("shop", sft='list the names of customers from {c} with a "{s}" order.',
             rl=('see which customers in {c} have an order with status "{s}".',
                 'show the names of customers in {c} who placed a "{s}" order.',
                 'list the unique {c} customers with at least one "{s}" order.',
                 'know which {c} customers have a "{s}" order.',
                 'get the names of the customers living in {c} with an order marked "{s}".',
                 'show every customer from {c} who has a "{s}" order.'),
             validation='see the names of {c} customers with "{s}" orders.',
             held_out='find the distinct names of {c} customers who have "{s}" orders.',
             sql="SELECT DISTINCT customers.name FROM customers JOIN orders ON orders.customer_id = "
                 "customers.customer_id WHERE customers.city = '{c}' AND orders.status = '{s}';",
             values=_combos(c=CITIES, s=STATUSES[:2])),
    Template("shop", sft="count the orders with an amount above {a}.",
             rl=("know how many orders cost more than {a}.",
                 "tell how many orders have an amount greater than {a}.",
                 "count orders worth more than {a}.",
                 "see how many orders are above {a} in amount.",
                 "get the count of orders with amount over {a}.",
                 "tally the orders larger than {a}."),
             validation="know the number of orders with an amount of more than {a}.",
             held_out="find the number of orders whose amount exceeds {a}.",
             sql="SELECT COUNT(*) FROM orders WHERE amount > {a};", values=_combos(a=(50, 100, 150, 200, 250))),
    Template("shop", sft="count the orders placed {w}.",
             rl=("know how many orders were made {w}.",
                 "tell how many orders were placed {w}.",
                 "count all orders created {w}.",
                 "see how many orders came in {w}.",
                 "tally the orders dated {w}.",
                 "know the count of orders placed {w}."),
             validation="show how many orders were placed {w}.",
             held_out="get the number of new orders {w}.",
             sql="SELECT COUNT(*) FROM orders WHERE order_date >= date('now', '{d}');",
             values=tuple({"w": w, "d": d} for w, d in WINDOWS), dated=True),
    Template("shop", sft="count the customers in each city.",
             rl=("know how many customers live in every city.",
                 "show the number of customers for each city.",
                 "count customers grouped by city.",
                 "see how many customers each city has.",
                 "tally customers by city.",
                 "list every city with its number of customers."),
             validation="know the customer count of each city.",
             held_out="get the number of customers per city.",
             sql="SELECT city, COUNT(*) FROM customers GROUP BY city;", values=({},)),
    Template("library", sft='count the {g} books.',
             rl=('know how many books have the genre "{g}".',
                 'tell how many {g} books there are.',
                 'count the books whose genre is {g}.',
                 'see how many books are {g}.',
                 'get the count of {g} books.',
                 'tally the books of genre {g}.'),
             validation='know the number of {g} books.',
             held_out='find the number of books in the {g} genre.',
             sql="SELECT COUNT(*) FROM books WHERE genre = '{g}';", values=_combos(g=GENRES)),
    Template("library", sft="list the titles of books by authors from {c}.",
             rl=("see which books were written by {c} authors.",
                 "show the titles of books written by authors from {c}.",
                 "list the books whose authors are from {c}.",
                 "know the titles written by authors who live in {c}.",
                 "show every book title by an author from {c}.",
                 "list what authors from {c} have written."),
             validation="see the titles of the books of {c} authors.",
             held_out="get the book titles whose author comes from {c}.",
             sql="SELECT books.title FROM books JOIN authors ON books.author_id = authors.author_id "
                 "WHERE authors.country = '{c}';", values=_combos(c=COUNTRIES)),
    Template("library", sft="count the {g} books published after {y}.",
             rl=("know how many {g} books came out after {y}.",
                 "tell how many {g} books were published after {y}.",
                 "count the {g} books with a publication year after {y}.",
                 "see how many {g} books appeared after {y}.",
                 "get the count of {g} books newer than {y}.",
                 "tally the {g} books with a year later than {y}."),
             validation="know the number of {g} books published after {y}.",
             held_out="find the number of {g} books from after the year {y}.",
             sql="SELECT COUNT(*) FROM books WHERE genre = '{g}' AND year > {y};",
             values=_combos(g=GENRES, y=(1970, 1990, 2000, 2010))),
    Template("library", sft="count the books per genre.",
             rl=("know how many books each genre has.",
                 "show the number of books for each genre.",
                 "count books grouped by genre.",
                 "see how many books there are of each genre.",
                 "tally the books by genre.",
                 "list every genre with its number of books."),
             validation="know the book count of each genre.",
             held_out="get the number of books in every genre.",
             sql="SELECT genre, COUNT(*) FROM books GROUP BY genre;", values=({},)),
)


@cache
def _template_patterns() -> tuple:
    """Each template's SQL as a regex: the literal text, with every {value} slot matching anything."""
    import re

    def pattern(sql: str):
        parts = re.split(r"\{\w+\}", sql)
        return re.compile("(.+?)".join(re.escape(p) for p in parts) + r"\Z")

    return tuple(pattern(t.sql) for t in TEMPLATES)


def template_of(gold_sql: str) -> int | None:
    """The index in TEMPLATES of the template a bundled gold query came from (None for any other SQL): per-template
    accuracy shows which kinds of question RL learns and which it does not (scripts/text2sql_breakdown.py)."""
    matches = [n for n, p in enumerate(_template_patterns()) if p.match(gold_sql)]
    return matches[0] if len(matches) == 1 else None


def text2sql_prompt(db_id: str, question: str, dated: bool = False) -> list[dict]:
    """The user turn in the article's form: the schema, what we want, then "SQL query for this is:"."""
    tables = [f"`{t}` with columns " + ", ".join(f"`{c}`" for c, _ in cols) for t, cols in SCHEMAS[db_id].items()]
    lines = [f"-- We have a table {tables[0]}." if len(tables) == 1 else
             f"-- We have tables {' and '.join(tables)}."]
    if dated:
        lines.append(f"-- Today is {REFERENCE_DATE}.")
    lines += [f"-- We want to {question}", "-- SQL query for this is:"]
    return [{"role": "user", "content": "\n".join(lines)}]


def _hash_share(key: str) -> float:
    """A stable number in [0, 1] for `key`: splits value combinations the same way on every machine."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def _trivial(result: list[tuple]) -> bool:
    """No rows or a lone 0/NULL: a wrong query too easily gives the same answer."""
    return not result or result in ([(0,)], [(None,)])


def build_text2sql_rows() -> dict[str, list[dict]]:
    """The four tables: SFT (prompt/completion), RL prompts, validation and held-out prompts (prompt, gold_sql,
    db_id). SFT rows use the SFT phrasing, RL prompts the RL phrasings, all x the training combinations; validation
    rows the validation phrasing x a third of the training combinations; held-out rows the held-out phrasing x the
    held-out combinations. Combinations with a trivial gold result are left out."""
    sft, rl, validation, held = [], [], [], []
    dbs = {db_id: build_database(db_id) for db_id in SCHEMAS}
    for n, t in enumerate(TEMPLATES):
        for values in t.values:
            sql = t.sql.format(**values)
            if _trivial(dbs[t.db_id].execute(sql.replace("'now'", f"'{REFERENCE_DATE}'")).fetchall()):
                continue
            ask = lambda phrasing: (t.db_id, phrasing.format(**values), sql, t.dated)  # noqa: B023  called in this pass
            key = f"{n}:{sorted(values.items())}"
            if _hash_share(key) < HELDOUT_SHARE:
                held.append(ask(t.held_out))
                continue
            sft.append(ask(t.sft))
            rl += [ask(phrasing) for phrasing in t.rl]
            if _hash_share("validation:" + key) < VALIDATION_SHARE:
                validation.append(ask(t.validation))
    order = lambda r: hashlib.sha1(r[1].encode()).hexdigest()  # noqa: E731  mixes templates and databases
    for rows in (sft, rl, validation, held):
        rows.sort(key=order)

    def row(db_id, question, sql, dated):
        return {"prompt": text2sql_prompt(db_id, question, dated), "gold_sql": sql, "db_id": db_id}

    demonstrations = [{"prompt": text2sql_prompt(db, q, d), "completion": [{"role": "assistant", "content": sql}]}
                      for db, q, sql, d in sft]
    return dict(zip(TEXT2SQL_FILES, (demonstrations, *([row(*r) for r in rows] for rows in (rl, validation, held)))))


def write_text2sql_files(out_dir: str | Path = BUNDLED_DIR) -> dict[str, int]:
    """(Re)generate the text2sql_*.jsonl files; returns rows per file. The files are committed; a test checks
    they match this function's output."""
    return write_jsonl_tables(build_text2sql_rows(), out_dir)
