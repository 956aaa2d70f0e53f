"""What the composed text-to-SQL questions (text2sql_shapes.py) can talk about: each column with its words and the
values its filters draw from, and the sources (a table, or two joined) whose columns a question combines."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .text2sql import CITIES, COUNTRIES, COUPONS, GENRES, METHODS, STATUSES


@dataclass(frozen=True)
class Col:
    sql: str  # as it appears in the query (qualified when the source joins two tables)
    one: str  # "rpc method"
    many: str  # "rpc methods"
    kind: str  # category | id | number | time | text
    values: tuple = ()  # what equality, IN and comparisons draw from
    eq: tuple[str, ...] = ()  # phrasings of "= {v}" after the rows' noun
    neq: str = ""  # the phrasing of "!= {v}"
    low: str = "smallest"  # MIN's word (earliest for years and times)
    high: str = "largest"
    summable: bool = True  # a total of years means nothing
    not_in: str = ""  # the phrasing of "NOT IN ({a}, {b})"
    nullable: bool = False  # NULL means "none": IS NULL / IS NOT NULL filters, never listed or grouped by
    null: tuple[str, str] = ("", "")  # the phrasings of IS NULL and IS NOT NULL
    table: str = ""  # the table the column belongs to: a subquery over all its rows (the average)


@dataclass(frozen=True)
class Source:
    db_id: str
    key: str
    from_sql: str
    rows: str  # plural noun: "requests"
    row: str  # singular: "request"
    columns: tuple[Col, ...]
    joined: str = ""  # "customers.": the joined table's prefix, which a shape over this source must use


_METHOD = Col("rpc_method", "rpc method", "rpc methods", "category", METHODS,
              ('with method "{v}"', 'to "{v}"', 'of type "{v}"'), 'to a method other than "{v}"',
              not_in='to neither "{a}" nor "{b}"')
_USER = Col("user_id", "user id", "user ids", "id", tuple(range(1, 41)), ("of user {v}", "from user {v}"))
_TIMESTAMP = Col("timestamp", "time", "times", "time", low="earliest", high="latest")
_STATUS = Col("status", "status", "statuses", "category", STATUSES, ('with status "{v}"', 'marked "{v}"'),
              'with a status other than "{v}"', not_in='with a status other than "{a}" and "{b}"')
_AMOUNT = Col("amount", "amount", "amounts", "number", (50, 100, 150, 200, 250), table="orders")
_COUPON = Col("coupon", "coupon", "coupons", "category", COUPONS, ('with coupon "{v}"', 'that used coupon "{v}"'),
              nullable=True, null=("that used no coupon", "that used a coupon"))
_ORDER_DATE = Col("order_date", "order date", "order dates", "time", low="earliest", high="latest")
_CITY = Col("city", "city", "cities", "category", CITIES, ("from {v}", "living in {v}"), "living outside {v}",
            not_in="living in neither {a} nor {b}")
_GENRE = Col("genre", "genre", "genres", "category", GENRES, ('of genre "{v}"', 'in the genre "{v}"'),
             'of a genre other than "{v}"', not_in='of a genre other than "{a}" and "{b}"')
_YEAR = Col("year", "publication year", "publication years", "number", (1970, 1990, 2000, 2010),
            low="earliest", high="latest", summable=False, table="books")
_COUNTRY = Col("country", "country", "countries", "category", COUNTRIES, ("from {v}", "based in {v}"),
               "based outside {v}", not_in="based in neither {a} nor {b}")


def _qualified(col: Col, table: str, **words) -> Col:
    """The column as one of a join's (table.column), with words that say whose it is where they must."""
    return dataclasses.replace(col, sql=f"{table}.{col.sql}", **words)


SOURCES = (
    Source("events", "events", "events", "requests", "request", (_METHOD, _USER, _TIMESTAMP)),
    Source("shop", "orders", "orders", "orders", "order", (_STATUS, _AMOUNT, _ORDER_DATE, _COUPON)),
    Source("shop", "orders+customers",
           "orders JOIN customers ON orders.customer_id = customers.customer_id", "orders", "order",
           (_qualified(_STATUS, "orders"), _qualified(_AMOUNT, "orders"),
            _qualified(_CITY, "customers", one="customer city", many="customer cities",
                       eq=("by customers from {v}", "placed by customers in {v}"),
                       neq="placed by customers outside {v}",
                       not_in="placed by customers living in neither {a} nor {b}")), "customers."),
    Source("shop", "customers", "customers", "customers", "customer", (_CITY,)),
    Source("library", "books", "books", "books", "book", (_GENRE, _YEAR)),
    Source("library", "books+authors", "books JOIN authors ON books.author_id = authors.author_id", "books", "book",
           (_qualified(_GENRE, "books"), _qualified(_YEAR, "books"),
            _qualified(_COUNTRY, "authors", one="author country", many="author countries",
                       eq=("by authors from {v}", "written by authors from {v}"),
                       neq="by authors from a country other than {v}",
                       not_in="by authors from neither {a} nor {b}")), "authors."),
)
