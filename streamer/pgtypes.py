"""Postgres's types as `to_jsonb` renders them, read from the catalog once per relation
layout (pgoutput names its columns' type oids): through domains to their base type, an
array with its element's kind, a range by its subtype. streamer/rowjson.py renders them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, Literal, NamedTuple

Kind = Literal[
    "bool", "integer", "numeric", "float", "string", "date", "timestamp", "timestamptz",
    "json", "jsonb", "array", "other",
]  # fmt: skip
# Every type a relation's columns name, with the types they are made of (a domain's base,
# an array's element, a range's subtype): $1 is the columns' type oids (an oid[]).
TYPES: Final = """
with recursive closure(oid) as (
    select unnest($1::oid[])
  union
    select r.ref from closure c
    join pg_type t on t.oid = c.oid left join pg_range g on g.rngtypid = t.oid
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
    16: "bool", 20: "integer", 21: "integer", 23: "integer", 1700: "numeric", 700: "float",
    701: "float", 1082: "date", 1114: "timestamp", 1184: "timestamptz", 114: "json", 3802: "jsonb",
    # text, varchar, bpchar, name, "char", uuid, oid, time, timetz, inet, cidr, macaddr,
    # macaddr8, bit, varbit, pg_lsn
    **dict.fromkeys(
        (25, 1043, 1042, 19, 18, 2950, 26, 1083, 1266, 869, 650, 829, 774, 1560, 1562, 3220),
        "string",
    ),
}  # fmt: skip
_ELEMENT_KINDS: Final = frozenset(_BUILTIN.values())  # what an array of ours may hold
_RANGE_SUBTYPES: Final = frozenset(("integer", "numeric", "date"))  # printed alike anywhere


@dataclasses.dataclass(frozen=True, slots=True)
class TypeInfo:
    """How to_jsonb renders a type: through domains, an array with its element's kind."""

    oid: int
    kind: Kind
    element: TypeInfo | None = None


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
    row = catalog.get(oid)
    if row is None:
        return TypeInfo(oid, "other")
    if row.typtype == "d":  # a domain is rendered as its base type
        return dataclasses.replace(_resolve(row.base, catalog), oid=oid)
    return _kind(oid, row, catalog)


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
