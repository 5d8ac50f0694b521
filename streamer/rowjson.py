"""A decoded row as Postgres renders it in JSON: the text `to_jsonb(row)::text` gives, byte
for byte, made from pgoutput's text values without asking the database.

jsonb prints an object's keys ordered by length, then bytewise, with ": " and ", "
between; it turns numbers (ints, numeric, floats) into numeric, so `1e-07` becomes
`0.0000001` and NaN or Infinity a string; timestamps become ISO 8601 ("T", "+00:00"); a
json value is parsed and printed again as jsonb; any other type is the JSON string of its
output text. The replication session must print values as the reading session does:
TimeZone 'UTC', DateStyle 'ISO, MDY', client_encoding UTF8, and extra_float_digits at its
default (1: shortest exact floats).

Never a wrong rendering: a type outside the ones named in `_BUILTIN` and `_kind`, a
composite, a value unlike what those settings print (a timestamptz not in UTC), a json
value jsonb refuses, or an UNCHANGED TOASTed value makes the rendering None: the caller
reads that row back from the table. A NULL is `null` whatever its type.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring
from typing import Any, Final, Literal, NamedTuple, NoReturn

from streamer.pgoutput import Relation, Values

Kind = Literal[
    "bool", "integer", "numeric", "float", "string", "date", "timestamp", "timestamptz",
    "json", "jsonb", "array", "other",
]  # fmt: skip
Render = Callable[[str], str]  # a non-NULL value's text to its JSON; raises Unrenderable

# Every type a relation's columns name, with the types they are made of (a domain's base,
# an array's element, a range's subtype): $1 is the columns' type oids (an oid[]).
TYPES: Final = """
with recursive closure(oid) as (
    select unnest($1::oid[])
  union
    select r.ref
    from closure c
    join pg_type t on t.oid = c.oid
    left join pg_range g on g.rngtypid = t.oid
    cross join lateral (values (t.typbasetype), (t.typelem), (g.rngsubtype)) r(ref)
    where r.ref <> 0
)
select t.oid, t.typtype::text, t.typcategory::text, t.typbasetype, t.typelem,
    t.typsubscript = 'array_subscript_handler'::regproc, t.typdelim::text,
    coalesce(g.rngsubtype, 0),
    exists (select from pg_cast k where k.castsource = t.oid and k.casttarget = 'json'::regtype)
from closure c join pg_type t on t.oid = c.oid left join pg_range g on g.rngtypid = t.oid
"""
FIRST_USER_OID: Final = 16384  # FirstNormalObjectId: to_jsonb honours casts to json above it
# Built-in types by oid. A "string" is the JSON string of the output text, which depends
# on no setting but TimeZone and DateStyle. Not here, so read back: money (lc_monetary),
# interval (IntervalStyle), bytea (bytea_output), geometric types (extra_float_digits).
_BUILTIN: Final[dict[int, Kind]] = {
    16: "bool",
    **dict.fromkeys((20, 21, 23), "integer"),  # int8, int2, int4
    1700: "numeric",
    **dict.fromkeys((700, 701), "float"),
    1082: "date",
    1114: "timestamp",
    1184: "timestamptz",
    114: "json",
    3802: "jsonb",
    # text, varchar, bpchar, name, "char", uuid, oid, time, timetz, inet, cidr, macaddr,
    # macaddr8, bit, varbit, pg_lsn, xml
    **dict.fromkeys(
        (25, 1043, 1042, 19, 18, 2950, 26, 1083, 1266, 869, 650, 829, 774, 1560, 1562, 3220, 142),
        "string",
    ),
}
_ELEMENT_KINDS: Final = frozenset(_BUILTIN.values())  # what an array of ours may hold
_RANGE_SUBTYPES: Final = frozenset(("integer", "numeric", "date"))  # printed alike anywhere
_DOMAIN_DEPTH = 64  # domains over domains: more is a cycle, not a schema


class Unrenderable(Exception):
    """A value this module cannot render exactly as Postgres would: read the row back."""


@dataclass(frozen=True, slots=True)
class TypeInfo:
    """How to_jsonb renders a type: through domains, an array with its element's kind."""

    oid: int
    kind: Kind
    element: TypeInfo | None = None

    @property
    def native(self) -> bool:
        return self.kind != "other"


class _Catalog(NamedTuple):  # a row of TYPES
    oid: int
    typtype: str
    category: str
    base: int
    element: int
    is_array: bool
    delimiter: str
    subtype: int
    json_cast: bool


def type_infos(rows: Iterable[Sequence[Any]]) -> dict[int, TypeInfo]:
    """TYPES' rows (asyncpg records or tuples) as the TypeInfo of every oid among them."""
    catalog = {row[0]: _Catalog(*row) for row in rows}
    return {oid: _resolve(oid, catalog) for oid in catalog}


def _resolve(oid: int, catalog: Mapping[int, _Catalog]) -> TypeInfo:
    base = oid
    for _ in range(_DOMAIN_DEPTH):
        row = catalog.get(base)
        if row is None:
            return TypeInfo(oid, "other")
        if row.typtype != "d":
            return _kind(oid, row, catalog)
        base = row.base
    return TypeInfo(oid, "other")


def _kind(oid: int, base: _Catalog, catalog: Mapping[int, _Catalog]) -> TypeInfo:
    """As jsonb_categorize_type sees the base type `base` of the type `oid`."""
    if base.oid in _BUILTIN:
        return TypeInfo(oid, _BUILTIN[base.oid])
    if base.is_array:
        element = _resolve(base.element, catalog)
        if element.kind in _ELEMENT_KINDS and base.delimiter == ",":
            return TypeInfo(oid, "array", element)
        return TypeInfo(oid, "other")
    if base.oid >= FIRST_USER_OID and base.json_cast:
        return TypeInfo(oid, "other")  # rendered by that cast
    user_string = base.typtype == "b" and base.oid >= FIRST_USER_OID and base.category == "S"
    if base.typtype == "e" or user_string:  # an enum, or citext and its kind
        return TypeInfo(oid, "string")
    if base.typtype == "r" and _resolve(base.subtype, catalog).kind in _RANGE_SUBTYPES:
        return TypeInfo(oid, "string")
    return TypeInfo(oid, "other")


def renderer(info: TypeInfo | None) -> Render:
    """The function rendering a non-NULL value of the type (unknown: None)."""
    if info is None or info.kind == "other":
        return _read_back
    if info.kind == "array":
        return functools.partial(_array, renderer(info.element))
    return _RENDER[info.kind]


def _read_back(text: str) -> NoReturn:
    raise Unrenderable("a type rendered by Postgres only")


def _verbatim(text: str) -> str:
    return text


def _bool(text: str) -> str:
    return "true" if text == "t" else "false"


def _numeric(text: str) -> str:
    # What to_jsonb tells a number from NaN and the infinities by.
    return '"' + text + '"' if "N" in text or "n" in text else text


def _float(text: str) -> str:
    if "n" in text or "N" in text:
        return '"' + text + '"'
    if "e" in text:
        return _decimal(text)
    return "0" if text == "-0" else text


_MAX_EXPONENT = 1000  # NUMERIC_MAX_PRECISION: numeric_in's bound on an exponent
_MAX_SCALE = 16383  # NUMERIC_DSCALE_MAX
_MAX_WHOLE_DIGITS = 131072  # numeric's digits before the point


def _decimal(text: str) -> str:
    """numeric_out(numeric_in(text)) for a number as a float or JSON prints it (1e-07,
    1.5E+20, -0): no exponent, numeric_in's scale (the fraction's digits less the
    exponent), no negative zero."""
    mantissa, _, exponent = text.replace("E", "e").partition("e")
    sign = "-" if mantissa[:1] == "-" else ""
    whole, _, fraction = mantissa.lstrip("+-").partition(".")
    shift = int(exponent) if exponent else 0
    if abs(shift) > _MAX_EXPONENT:
        raise Unrenderable("numeric overflow")
    digits, point = whole + fraction, len(whole) + shift
    if point <= 0:
        digits, point = "0" * (1 - point) + digits, 1
    elif point > len(digits):
        digits += "0" * (point - len(digits))
    integral, fractional = digits[:point].lstrip("0") or "0", digits[point:]
    if len(fractional) > _MAX_SCALE or len(integral) > _MAX_WHOLE_DIGITS:
        raise Unrenderable("numeric overflow")
    if sign and integral == "0" and not fractional.strip("0"):
        sign = ""
    return sign + integral + ("." + fractional if fractional else "")


_INFINITE = frozenset(("infinity", "-infinity"))
_DATE = re.compile(r"\d{4,}-\d\d-\d\d(?: BC)?")
_TIMESTAMP = re.compile(r"(\d{4,}-\d\d-\d\d) (\d\d:\d\d:\d\d(?:\.\d+)?)( BC)?")
_TIMESTAMPTZ = re.compile(r"(\d{4,}-\d\d-\d\d) (\d\d:\d\d:\d\d(?:\.\d+)?)\+00( BC)?")


def _date(text: str) -> str:
    if _DATE.fullmatch(text) is None and text not in _INFINITE:
        raise Unrenderable("a date not in DateStyle ISO")
    return '"' + text + '"'


def _timestamp(text: str) -> str:
    match = _TIMESTAMP.fullmatch(text)
    if match is None:
        return _date(text)  # infinity, or Unrenderable
    date, time, era = match.groups()
    return f'"{date}T{time}{era or ""}"'


def _timestamptz(text: str) -> str:
    match = _TIMESTAMPTZ.fullmatch(text)
    if match is None:
        if text in _INFINITE:
            return '"' + text + '"'
        raise Unrenderable("a timestamptz not in TimeZone UTC and DateStyle ISO")
    date, time, era = match.groups()
    return f'"{date}T{time}+00:00{era or ""}"'


class _Number(str):
    """A JSON number's text as written."""


def _no_constant(name: str) -> NoReturn:
    raise Unrenderable(f"{name} is not JSON")


_JSON = json.JSONDecoder(parse_float=_Number, parse_int=_Number, parse_constant=_no_constant)


def _json(text: str) -> str:
    """A json value as jsonb prints it: parsed, the last of duplicate keys kept."""
    try:
        rendered = _jsonb(_JSON.decode(text))
        if "\\u" in text:
            rendered.encode()  # a lone surrogate escaped: jsonb refuses it
    except (ValueError, RecursionError, UnicodeEncodeError) as exc:
        raise Unrenderable(f"json that jsonb does not take: {exc}") from None
    return rendered


def _jsonb(value: object) -> str:
    if isinstance(value, str):
        if isinstance(value, _Number):
            return _decimal(value)
        if "\x00" in value:
            raise Unrenderable("\\u0000 in json")
        return encode_basestring(value)
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join([_jsonb(item) for item in value]) + "]"
    assert isinstance(value, dict)
    pairs = sorted(value.items(), key=_key_order)
    return "{" + ", ".join([_jsonb(key) + ": " + _jsonb(item) for key, item in pairs]) + "}"


def _key_order(pair: tuple[str, object]) -> tuple[int, str]:
    # jsonb: shorter keys first, then bytewise (UTF-8 sorts as its code points do).
    return len(pair[0].encode()), pair[0]


# An array's output: a quoted element (with \" and \\ escaped), a brace or comma, or an
# unquoted element (never with spaces, quotes or backslashes in it).
_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"|[{},]|[^{},"]+', re.DOTALL)
_ESCAPED = re.compile(r"\\(.)", re.DOTALL)


def _array(element: Render, text: str) -> str:
    """An array's output as to_jsonb prints it: nested lists, lower bounds dropped."""
    if text[:1] == "[":  # "[0:2]={...}": bounds other than 1
        text = text[text.find("]=") + 2 :]
    if text[:1] != "{" or text[-1:] != "}":
        raise Unrenderable("not an array's output")
    if '"' not in text and text.count("{") == 1:  # one dimension, nothing quoted
        if text == "{}":
            return "[]"
        items = text[1:-1].split(",")
        return "[" + ", ".join(["null" if i == "NULL" else element(i) for i in items]) + "]"
    parts, pos = [], 0
    for match in _TOKEN.finditer(text):
        if match.start() != pos:
            raise Unrenderable("not an array's output")
        pos, token, quoted = match.end(), match[0], match[1]
        if quoted is not None:
            parts.append(element(_ESCAPED.sub(r"\1", quoted) if "\\" in quoted else quoted))
        elif token in _ARRAY_PUNCTUATION:
            parts.append(_ARRAY_PUNCTUATION[token])
        else:
            parts.append("null" if token == "NULL" else element(token))
    if pos != len(text):
        raise Unrenderable("not an array's output")
    return "".join(parts)


_ARRAY_PUNCTUATION = {"{": "[", "}": "]", ",": ", "}
_RENDER: Final[dict[str, Render]] = {
    "bool": _bool,
    "integer": _verbatim,
    "numeric": _numeric,
    "float": _float,
    "string": encode_basestring,
    "date": _date,
    "timestamp": _timestamp,
    "timestamptz": _timestamptz,
    "json": _json,
    "jsonb": _verbatim,  # jsonb's output is what to_jsonb embeds
}


class Shape:
    """Some columns of a relation's rows and extra keys, as one JSON object with its keys
    in jsonb's order: what `jsonb_build_object` of them gives."""

    __slots__ = ("_plan", "_width", "complete", "native")

    def __init__(self, renderer: RowRenderer, columns: Sequence[str], extra: Sequence[str]):
        keys = [*columns, *extra]
        if len(set(keys)) != len(keys):
            raise ValueError(f"a key twice among {keys}")
        self._width = len(renderer.names)
        self.complete = all(name in renderer.names for name in columns)  # else: read back
        self.native = self.complete and all(renderer.native(name) for name in columns)
        entries: list[tuple[str, int, Render | None]] = [
            (key, renderer.index(key), renderer.render_of(key)) for key in columns if self.complete
        ]
        entries += [(key, i, None) for i, key in enumerate(extra)]
        entries.sort(key=lambda entry: (len(entry[0].encode()), entry[0]))
        self._plan = tuple(
            (("" if n == 0 else ", ") + encode_basestring(key) + ": ", index, render)
            for n, (key, index, render) in enumerate(entries)
        )

    def render(self, values: Values, extra: Sequence[str] = ()) -> str | None:
        """The object of `values` (a tuple of the relation's) and the extra keys' JSON
        values, in the order they were named; None: read the row back."""
        if len(values) != self._width:
            raise ValueError(f"{len(values)} values for a relation of {self._width} columns")
        if not self.complete:
            return None
        parts: list[str] = []
        append = parts.append
        try:
            for prefix, index, render in self._plan:
                if render is None:
                    append(prefix + extra[index])
                    continue
                value = values[index]
                if type(value) is str:
                    append(prefix + render(value))
                elif value is None:
                    append(prefix + "null")
                else:  # UNCHANGED
                    return None
        except Unrenderable:
            return None
        return "{" + "".join(parts) + "}"


class RowRenderer:
    """The rows of one relation, its columns as its Relation message lists them (name,
    type oid), with `types` from `type_infos`."""

    def __init__(self, columns: Iterable[tuple[str, int]], types: Mapping[int, TypeInfo]):
        pairs = list(columns)
        self.names = tuple(name for name, _ in pairs)
        self._index = {name: i for i, name in enumerate(self.names)}
        self._types = tuple(types.get(oid) for _, oid in pairs)
        self._render = tuple(renderer(info) for info in self._types)
        self._whole = Shape(self, self.names, ())

    @classmethod
    def for_relation(cls, relation: Relation, types: Mapping[int, TypeInfo]) -> RowRenderer:
        return cls(((c.name, c.type_oid) for c in relation.columns), types)

    def index(self, name: str) -> int:
        """The column's position in a tuple; KeyError if the relation has none so named."""
        return self._index[name]

    def render_of(self, name: str) -> Render:
        return self._render[self._index[name]]

    def native(self, name: str) -> bool:
        """Whether the column's type is rendered here (its values may still not be)."""
        info = self._types[self._index[name]]
        return info is not None and info.native

    def value(self, values: Values, name: str) -> str | None:
        """One column's JSON ("null" for NULL); None: read the row back."""
        value = values[self._index[name]]
        if value is None:
            return "null"
        if type(value) is not str:  # UNCHANGED
            return None
        try:
            return self.render_of(name)(value)
        except Unrenderable:
            return None

    def row(self, values: Values) -> str | None:
        """`to_jsonb(r)::text` of the row, if the relation's columns are all the table's
        (a publication's column list, or generated columns before PostgreSQL 18, leave
        some out); None: read the row back."""
        return self._whole.render(values)

    def shape(self, columns: Sequence[str], extra: Sequence[str] = ()) -> Shape:
        """Columns and extra keys (whose JSON values `Shape.render` is given) as one
        object. A column the relation lacks makes every rendering None."""
        return Shape(self, columns, extra)
