"""A stream's shape: the rows and columns a client asks for on GET /api/<feed>/events
(SPEC.md, "Shaped streams"), in PostgREST's grammar: `status=in.(pending,processing)`,
`progress=not.gte.50`, `select=id,status`.

A shape is parsed and checked once per request. Then `matches` decides on each change, in
Python, and `where` asks Postgres the same for snapshots and catch-ups. The two agree:
SQL receives each value's canonical text cast to the column's type and compares as
streamer/values.py does; NULL is SQL's (a comparison with NULL is not true, under `not.`
too); text orders by code point (`COLLATE "C"`).

ilike folds case as Postgres's lower() does with a UTF-8 LC_CTYPE (C.UTF-8, en_US.UTF-8):
by Unicode's simple mapping. With LC_CTYPE C (ASCII only) or ICU (a final sigma, a dotted
capital I), a non-ASCII letter of another case can match live and not in a snapshot.
"""

from __future__ import annotations

import hashlib
import json
import operator as compare
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from functools import cached_property
from typing import Any
from urllib.parse import quote

from streamer.errors import InvalidFilter
from streamer.values import KINDS, Kind, show

NOT_FILTERS = frozenset({"snapshot", "last_event_id", "access_token", "select"})
OPERATORS = ("eq", "neq", "lt", "lte", "gt", "gte", "like", "ilike", "in", "is")
MAX_FILTERS = 20
MAX_VALUES = 100  # in one in.(...)
MAX_VALUE = 1024  # characters of one value
ALWAYS = frozenset({"id", "version"})  # in every row a stream sends, whatever it selects

_COMPARE: dict[str, tuple[str, Callable[[Any, Any], bool]]] = {
    "eq": ("=", compare.eq), "neq": ("<>", compare.ne), "lt": ("<", compare.lt),
    "lte": ("<=", compare.le), "gt": (">", compare.gt), "gte": (">=", compare.ge),
}  # fmt: skip
_IS: dict[str, bool | None] = {"null": None, "true": True, "false": False}
_QUOTE_IN = frozenset(',()"\\')  # what an in.(...) value is written in double quotes with
# Where Python's lower() is not Postgres's: a dotted capital I (Python's gives an i and a
# combining dot), and a capital sigma at a word's end (Python's gives the final sigma).
_AS_POSTGRES = str.maketrans(
    {
        "\N{LATIN CAPITAL LETTER I WITH DOT ABOVE}": "i",
        "\N{GREEK CAPITAL LETTER SIGMA}": "\N{GREEK SMALL LETTER SIGMA}",
    }
)
_READABLE = '(),*:"\\'  # left as they are in the canonical form (it stays unambiguous)


def load_row(text: str | bytes) -> dict[str, Any]:
    """A row's JSON as `matches` compares it exactly: numeric's digits kept as Decimal."""
    row: dict[str, Any] = json.loads(text, parse_float=Decimal)
    return row


def fold(text: str) -> str:
    """Lower case as Postgres's lower() in a UTF-8 locale: character by character."""
    return text.translate(_AS_POSTGRES).lower()


def _like(parts: tuple[str, ...], text: str) -> bool:
    """Whether `text` matches a pattern cut at its `*`s. Without a regular expression: the
    leftmost match of each part is the one to take, and nothing backtracks."""
    if len(parts) == 1:
        return text == parts[0]
    first, *middle, last = parts
    if len(text) < len(first) + len(last) or not (text.startswith(first) and text.endswith(last)):
        return False
    at, end = len(first), len(text) - len(last)
    for part in middle:
        found = text.find(part, at, end)
        if found < 0:
            return False
        at = found + len(part)
    return True


def _like_pattern(value: str) -> str:
    """A `*` pattern as SQL's LIKE reads it: `*` is `%`, every other character literal."""
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%")


def _quote_in(value: str) -> str:
    if value and not _QUOTE_IN & set(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class Filter:
    """One `column=[not.]operator.value`: `keys` as streamer/values.py compares them (for
    like and ilike, the pattern cut at its wildcards), `texts` as SQL receives them."""

    column: str
    operator: str
    negated: bool
    kind: Kind
    keys: tuple[Any, ...]
    texts: tuple[str, ...]

    def test(self, value: Any) -> bool | None:
        """The filter on a row's JSON value, in SQL's logic: None is unknown."""
        if self.operator == "is":
            held = value is self.keys[0]
        elif value is None:
            return None
        else:
            try:
                held = self._holds(value)
            except (TypeError, ValueError, ArithmeticError):
                return None  # not of the column's type: the table changed under the stream
        return held != self.negated

    def _holds(self, value: Any) -> bool:
        if self.operator in ("like", "ilike"):
            text = self.kind.load(value)
            return _like(self.keys[0], fold(text) if self.operator == "ilike" else text)
        key = self.kind.load(value)
        if self.operator == "in":
            return key in self.keys
        return _COMPARE[self.operator][1](key, self.keys[0])

    def sql(self, column: str, bind: Callable[[Any], str]) -> str:
        """The filter over `column` (an SQL expression), its values bound as text."""
        kind, op = self.kind, self.operator
        cast = "" if kind.text else f"::{kind.sql_type}"
        if op == "is":
            expression = f"{column} is {self.texts[0]}"
        elif op == "in":
            array = "" if kind.text else f"::{kind.sql_type}[]"
            expression = f"{column} = any({bind(list(self.texts))}::text[]{array})"
        elif op == "like":
            expression = f'{column} collate "C" like {bind(_like_pattern(self.texts[0]))}::text'
        elif op == "ilike":
            pattern = bind(_like_pattern(self.texts[0]))
            expression = f'{column} collate "default" ilike {pattern}::text'
        else:
            # Equality needs no collation (every deterministic one agrees), and so keeps an
            # index on the column in use; an order is the code points'.
            collate = ' collate "C"' if kind.text and op not in ("eq", "neq") else ""
            value = f"{bind(self.texts[0])}::text{cast}"
            expression = f"{column}{collate} {_COMPARE[op][0]} {value}"
        return f"not ({expression})" if self.negated else f"({expression})"

    def render(self) -> str:
        """The filter as a query parameter would write it, canonically."""
        in_list = "(" + ",".join(map(_quote_in, self.texts)) + ")"
        value = in_list if self.operator == "in" else self.texts[0]
        return f"{'not.' if self.negated else ''}{self.operator}.{value}"


@dataclass(frozen=True)
class Shape:
    """The filters (ANDed) and the selected columns (None: every column) of a stream."""

    filters: tuple[Filter, ...] = ()
    select: frozenset[str] | None = None

    @cached_property
    def canonical(self) -> str:
        """The shape as a query string, the same whatever order or spelling asked for it;
        parse_shape reads it back to this shape. Empty when the shape is everything."""
        parts = [
            f"{quote(f.column, safe='')}={quote(f.render(), safe=_READABLE)}" for f in self.filters
        ]
        if self.select is not None:
            parts.append("select=" + ",".join(quote(name, safe="") for name in sorted(self.select)))
        return "&".join(parts)

    @cached_property
    def key(self) -> str:
        """A short name for the shape, for cursors and for evaluating each shape once per
        change: empty for the unshaped stream (so a cursor without one belongs to it)."""
        if not self.canonical:
            return ""
        return hashlib.sha256(self.canonical.encode()).hexdigest()[:16]

    def matches(self, row: Mapping[str, Any]) -> bool:
        """Whether the row (its JSON, best decoded by load_row) is in the stream."""
        return all(f.test(row.get(f.column)) is True for f in self.filters)

    def project(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """The row as the stream sends it: the selected columns, id and version."""
        if self.select is None:
            return dict(row)
        return {name: value for name, value in row.items() if name in self.select}

    def where(self, first_param: int = 1, alias: str | None = None) -> tuple[str, list[Any]]:
        """An SQL condition over the table's columns (of `alias`, when given) that holds for
        the rows `matches` takes, and its parameters: $first_param, $first_param + 1, ...,
        each a string or a list of strings."""
        params: list[Any] = []

        def bind(value: Any) -> str:
            params.append(value)
            return f"${first_param + len(params) - 1}"

        prefix = f"{alias}." if alias else ""
        parts = [f.sql(prefix + _identifier(f.column), bind) for f in self.filters]
        return " and ".join(parts) or "true", params


EVERYTHING = Shape()


def _identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def parse_shape(params: Iterable[tuple[str, str]], columns: Mapping[str, str]) -> Shape:
    """The shape that a request's query parameters ask for, on a feed whose columns (id
    included) have these types (Postgres's names, format_type's without modifiers).
    InvalidFilter names what is wrong."""
    filters: dict[str, Filter] = {}
    select: frozenset[str] | None = None
    selected, count = False, 0
    for name, raw in params:
        if name == "select":
            if selected:
                raise InvalidFilter("select may be given once.")
            selected, select = True, parse_select(raw, columns)
        elif name not in NOT_FILTERS:
            count += 1
            if count > MAX_FILTERS:
                raise InvalidFilter(f"A stream takes at most {MAX_FILTERS} filters.")
            parsed = parse_filter(name, raw, columns)
            filters[f"{parsed.column}={parsed.render()}"] = parsed
    return Shape(tuple(filters[name] for name in sorted(filters)), select)


def parse_select(raw: str, columns: Mapping[str, str]) -> frozenset[str] | None:
    """`select=id,status`: those columns, id and version; `*`: every column (None)."""
    names = [name.strip() for name in raw.split(",")]
    if names == ["*"]:
        return None
    if "" in names:
        raise InvalidFilter(f"select={show(raw)} names an empty column: write select=id,status.")
    for name in names:
        if name not in columns and name not in ALWAYS:
            raise InvalidFilter(f"select names an unknown column {show(name)}{_known(columns)}.")
    return frozenset(names) | ALWAYS


def _known(columns: Mapping[str, str]) -> str:
    return ": the feed's columns are " + ", ".join(sorted(columns))


def parse_filter(column: str, raw: str, columns: Mapping[str, str]) -> Filter:
    """One query parameter `column=[not.]operator.value`."""
    if column not in columns:
        raise InvalidFilter(f"Filter on an unknown column {show(column)}{_known(columns)}.")
    kind = KINDS.get(columns[column])
    if kind is None:
        raise InvalidFilter(
            f"Column {show(column)} is of type {columns[column]}, which cannot be filtered"
            " (text, numbers, booleans, UUIDs, dates and timestamps can)."
        )
    negated = raw.startswith("not.")
    operator, dot, value = raw.removeprefix("not.").partition(".")
    named = f"Filter {show(column + '=' + raw)}"
    if not dot:
        raise InvalidFilter(f"{named} has no operator: write {column}=eq.{operator or '<value>'}.")
    if operator not in OPERATORS:
        raise InvalidFilter(
            f"{named} has an unknown operator {show(operator)}: one of {', '.join(OPERATORS)},"
            " each may follow not."
        )
    try:
        return _filter(column, operator, negated, kind, value)
    except ValueError as error:
        raise InvalidFilter(f"{named}: {error}.") from None


def _filter(column: str, operator: str, negated: bool, kind: Kind, value: str) -> Filter:
    if operator == "is":
        word = value.lower()
        if word not in _IS:
            raise ValueError(f"is takes null, true or false, not {show(value)}")
        if word != "null" and kind.name != "boolean":
            raise ValueError(f"is.{word} applies to boolean columns, and {column} is {kind.name}")
        return Filter(column, operator, negated, kind, (_IS[word],), (word,))
    if operator in ("like", "ilike"):
        if not kind.text:
            raise ValueError(f"{operator} applies to text columns, and {column} is {kind.name}")
        pattern = _checked(value, kind)[1]
        cut = (fold(pattern) if operator == "ilike" else pattern).split("*")
        return Filter(column, operator, negated, kind, (tuple(cut),), (pattern,))
    values = _in_values(value) if operator == "in" else [value]
    canonical = dict(sorted((text, key) for key, text in (_checked(v, kind) for v in values)))
    return Filter(column, operator, negated, kind, tuple(canonical.values()), tuple(canonical))


def _checked(value: str, kind: Kind) -> tuple[Any, str]:
    if len(value) > MAX_VALUE:
        raise ValueError(
            f"a value is at most {MAX_VALUE} characters, {show(value)} has {len(value)}"
        )
    return kind.parse(value)


def _in_values(value: str) -> list[str]:
    """The values of `in.(a,"b,c")`: PostgREST's list, where a value that holds a comma, a
    parenthesis or a quote is in double quotes (and a backslash escapes in quotes)."""
    if len(value) < 2 or value[0] != "(" or value[-1] != ")":
        raise ValueError(f"in takes a list in parentheses, e.g. in.(a,b), not {show(value)}")
    body, values, at = value[1:-1], [], 0
    while body:
        if body[at : at + 1] == '"':
            item, at = _quoted(body, at + 1)
        else:
            end = body.find(",", at)
            item, at = body[at : len(body) if end < 0 else end], len(body) if end < 0 else end
            if set(item) & set('"()'):
                raise ValueError(
                    f"{show(item)} holds a parenthesis or a quote: write it in double quotes,"
                    ' e.g. in.("a,b",c)'
                )
        values.append(item)
        if at == len(body):
            break
        if body[at] != ",":
            raise ValueError(f"a quoted value in {show(value)} is followed by more than a comma")
        at += 1
    if not values:
        raise ValueError("in.() needs at least one value")
    if len(values) > MAX_VALUES:
        raise ValueError(f"in takes at most {MAX_VALUES} values, not {len(values)}")
    return values


def _quoted(body: str, at: int) -> tuple[str, int]:
    """The value in double quotes that starts at `at`, and where it ends."""
    chars: list[str] = []
    while at < len(body):
        if body[at] == "\\" and at + 1 < len(body):
            chars.append(body[at + 1])
            at += 2
        elif body[at] == '"':
            return "".join(chars), at + 1
        else:
            chars.append(body[at])
            at += 1
    raise ValueError(f"a quoted value in {show(body)} has no closing quote")
