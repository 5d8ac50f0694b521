"""A decoded row as Postgres renders it in JSON: byte for byte the text of
`to_jsonb(row)::text`, made from pgoutput's text values without asking the database.

jsonb orders an object's keys by length, then bytewise, with ": " and ", " between; it
makes numbers numeric (`1e-07` is `0.0000001`, NaN and Infinity strings), timestamps ISO
8601, json jsonb again, and any other type the JSON string of its output text. So the
replication session must print values as the reading one does: TimeZone 'UTC', DateStyle
'ISO, MDY', client_encoding UTF8, extra_float_digits at its default (shortest exact).

Never a wrong rendering: a type not rendered here (see `_BUILTIN` and `_kind`), a value
unlike what those settings print, a json value jsonb refuses, or an UNCHANGED TOASTed value
makes the rendering None, and the caller reads the row back. NULL is null for any type.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from json.encoder import encode_basestring
from typing import Any, Final, NoReturn

from streamer.pgoutput import Values
from streamer.pgtypes import TYPES as TYPES
from streamer.pgtypes import TypeInfo

Render = Callable[[str], str]  # a non-NULL value's text to its JSON; raises Unrenderable


class Unrenderable(Exception):
    """A value this module cannot render exactly as Postgres would: read the row back."""


def renderer(info: TypeInfo | None) -> Render:
    """The function rendering a non-NULL value of the type (None: an unknown type)."""
    if info is None or info.kind == "other":
        return _read_back
    if info.kind == "array":
        return functools.partial(_array, renderer(info.element))
    return _RENDER[info.kind]


def _read_back(text: str) -> NoReturn:
    raise Unrenderable("a type rendered by Postgres only")


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


_MAX_SCALE = 16383  # NUMERIC_DSCALE_MAX: digits after the point
_MAX_WHOLE_DIGITS = 131072  # numeric's digits before the point


def _decimal(text: str) -> str:
    """numeric_out(numeric_in(text)) for a number as a float or JSON prints it (1e-07,
    1.5E+20, -0): no exponent, numeric_in's scale (the fraction's digits less the
    exponent), no negative zero."""
    mantissa, _, exponent = text.replace("E", "e").partition("e")
    sign = "-" if mantissa[:1] == "-" else ""
    whole, _, fraction = mantissa.lstrip("+-").partition(".")
    shift = int(exponent) if exponent else 0
    if shift > _MAX_WHOLE_DIGITS or -shift > _MAX_SCALE + len(whole):  # before padding
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
_TIMESTAMP = re.compile(r"(\d{4,}-\d\d-\d\d) (\d\d:\d\d:\d\d(?:\.\d+)?)(\+00)?( BC)?")


def _date(text: str) -> str:
    if _DATE.fullmatch(text) is None and text not in _INFINITE:
        raise Unrenderable("a date not in DateStyle ISO")
    return '"' + text + '"'


def _timestamp(text: str, utc: str = "") -> str:
    """ISO 8601 as to_jsonb prints it: "T", and for a timestamptz (`utc` "+00", which its
    text must end with: TimeZone UTC) "+00:00"."""
    zone = utc and "+00:00"
    if text[4:5] == "-" and text[10:11] == " " and text[-1] != "C" and text.endswith(utc):
        return '"' + text[:10] + "T" + text[11 : len(text) - len(utc)] + zone + '"'
    match = _TIMESTAMP.fullmatch(text)
    if match is not None and (match[3] or "") == utc:  # BC, or a year past 9999
        return f'"{match[1]}T{match[2]}{zone}{match[4] or ""}"'
    if text in _INFINITE:
        return '"' + text + '"'
    raise Unrenderable("a timestamp not in DateStyle ISO (or, with a zone, TimeZone UTC)")


class _Number(str):
    """A JSON number's text as written."""


# parse_constant: NaN and Infinity, which are not JSON.
_JSON = json.JSONDecoder(parse_float=_Number, parse_int=_Number, parse_constant=_read_back)


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


def _key_order(pair: tuple[Any, ...]) -> tuple[int, str]:
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
    "bool": _bool, "integer": str, "numeric": _numeric, "float": _float,
    "string": encode_basestring, "date": _date, "timestamp": _timestamp,
    "timestamptz": functools.partial(_timestamp, utc="+00"), "json": _json,
    "jsonb": str,  # its output is what to_jsonb embeds
}  # fmt: skip


class Shape:
    """Some columns of a relation's rows and extra keys as one JSON object, its keys in
    jsonb's order: what `jsonb_build_object` of them gives. Made by `RowRenderer.shape`."""

    __slots__ = ("_plan", "_width")

    def __init__(self, plan: tuple[tuple[str, int, Render | None], ...] | None, width: int):
        # (", " and the key, a column's index or an extra's, its Render); None: a column
        # the relation lacks, so always read back.
        self._plan = plan
        self._width = width

    def render(self, values: Values, extra: Sequence[str] = ()) -> str | None:
        """The object of `values` (a tuple of the relation's) and the extra keys' JSON
        values, in the order they were named; None: read the row back."""
        if len(values) != self._width:
            raise ValueError(f"{len(values)} values for a relation of {self._width} columns")
        if self._plan is None:
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
    """The rows of one relation, its columns (name, type oid) as its Relation message
    lists them, with `types` from `type_infos`."""

    def __init__(self, columns: Iterable[tuple[str, int]], types: Mapping[int, TypeInfo]):
        pairs = list(columns)
        self.names = tuple(name for name, _ in pairs)
        self._index = {name: i for i, name in enumerate(self.names)}
        self._types = tuple(types.get(oid) for _, oid in pairs)
        self._render = tuple(renderer(info) for info in self._types)
        self._whole = self.shape(self.names)

    def index(self, name: str) -> int:
        """The column's position in a tuple; KeyError if the relation has none so named."""
        return self._index[name]

    def native(self, name: str) -> bool:
        """Whether the column's type is rendered here (its values may still not be)."""
        info = self._types[self._index[name]]
        return info is not None and info.kind != "other"

    def value(self, values: Values, name: str) -> str | None:
        """One column's JSON ("null" for NULL); None: read the row back."""
        index = self._index[name]
        value = values[index]
        if type(value) is not str:
            return "null" if value is None else None  # None: UNCHANGED
        try:
            return self._render[index](value)
        except Unrenderable:
            return None

    def row(self, values: Values) -> str | None:
        """`to_jsonb(r)::text`, if the relation's columns are all the table's (a column
        list of the publication, or generated columns before PostgreSQL 18, leave some
        out); None: read the row back."""
        return self._whole.render(values)

    def shape(self, columns: Sequence[str], extra: Sequence[str] = ()) -> Shape:
        """Columns and extra keys (their JSON values given to `Shape.render`) as one
        object; a column the relation lacks makes every rendering None."""
        keys = [*columns, *extra]
        if len(set(keys)) != len(keys):
            raise ValueError(f"a key twice among {keys}")
        if not all(name in self._index for name in columns):
            return Shape(None, len(self.names))
        entries: list[tuple[str, int, Render | None]] = [
            (name, self._index[name], self._render[self._index[name]]) for name in columns
        ]
        entries += [(key, i, None) for i, key in enumerate(extra)]
        entries.sort(key=_key_order)
        plan = tuple(
            ((", " if n else "") + encode_basestring(key) + ": ", index, render)
            for n, (key, index, render) in enumerate(entries)
        )
        return Shape(plan, len(self.names))
