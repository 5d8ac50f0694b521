"""A stream's shape (streamer/shapes.py): PostgREST's filters and select parsed, checked,
named canonically, evaluated on a row's JSON, and rendered to SQL that Postgres agrees
with, row for row, on random shapes over random rows of every type a filter takes."""

from __future__ import annotations

import datetime as dt
import json
import math
import random
import uuid
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl

import asyncpg
import pytest

from streamer.errors import InvalidFilter
from streamer.shapes import EVERYTHING, MAX_VALUE, Shape, load_row, parse_shape
from streamer.values import KINDS

FILES = {
    "id": "uuid",
    "filename": "text",
    "file_type": "character varying",
    "status": "text",
    "progress": "integer",
    "size": "bigint",
    "ratio": "numeric",
    "score": "real",
    "weight": "double precision",
    "public": "boolean",
    "created_at": "timestamp with time zone",
    "local_at": "timestamp without time zone",
    "due": "date",
    "tags": "text[]",
    "meta": "jsonb",
}


def shaped(*params: str, columns: dict[str, str] = FILES) -> Shape:
    """The shape of query parameters written `name=value`, taken literally (no URL
    decoding), so that a test reads as the value the server receives."""
    pairs = [param.partition("=") for param in params]
    return parse_shape([(name, value) for name, _, value in pairs], columns)


def matches(param: str, **row: Any) -> bool:
    return shaped(param).matches(row)


def test_an_empty_shape_matches_every_row_and_is_true_in_sql():
    shape = shaped()
    assert shape == EVERYTHING
    assert shape.matches({}) and shape.matches({"status": None})
    assert shape.where(5) == ("true", [])
    assert shape.canonical == "" and shape.key == ""


def test_snapshot_last_event_id_and_access_token_are_not_filters():
    shape = shaped("snapshot=1", "last_event_id=abc", "access_token=x.y.z")
    assert shape == EVERYTHING


def test_a_filter_names_a_column_an_operator_and_a_value():
    shape = shaped("status=in.(pending,processing)", "progress=gte.50")
    assert shape.matches({"status": "pending", "progress": 50})
    assert not shape.matches({"status": "pending", "progress": 49})
    assert not shape.matches({"status": "ready", "progress": 100})


@pytest.mark.parametrize(
    ("param", "value", "expected"),
    [
        ("status=eq.ready", "ready", True),
        ("status=eq.ready", "Ready", False),
        ("status=neq.ready", "failed", True),
        ("status=lt.b", "a", True),
        ("status=lt.b", "B", True),  # code points: "B" < "a" < "b"
        ("status=lte.b", "b", True),
        ("status=gt.b", "é", True),
        ("status=gte.b", "a", False),
        ("status=in.(a,b)", "b", True),
        ("status=in.(a,b)", "c", False),
        ("progress=eq.007", 7, True),
        ("progress=gt.-5", -4, True),
        ("progress=lte.+5", 5, True),
        ("progress=in.(1,2,3)", 4, False),
        ("file_type=eq.pdf", "pdf", True),
        ("file_type=like.*.pdf", "report.pdf", True),
        ("filename=like.rep*", "report.pdf", True),
        ("filename=like.rep*", "a report", False),
        ("filename=ilike.REP*PDF", "report.pdf", True),
        ("filename=like.*", "", True),
        ("ratio=eq.1.50", Decimal("1.5"), True),
        ("ratio=gt.1e-3", Decimal("0.0011"), True),
        ("ratio=lt.Infinity", Decimal("1e300"), True),
        ("ratio=gt.Infinity", "NaN", True),  # Postgres orders NaN above every number
        ("ratio=eq.NaN", "NaN", True),
        ("ratio=lt.-1", "-Infinity", True),
        ("score=eq.0.1", Decimal("0.1"), True),  # both rounded to the nearest real
        ("score=eq.0.1000001", Decimal("0.1"), False),
        ("weight=eq.0.1", Decimal("0.1"), True),
        ("weight=eq.-0", 0, True),
        ("weight=gt.1e308", "Infinity", True),
        ("size=eq.9223372036854775807", 9223372036854775807, True),
        ("public=eq.true", True, True),
        ("public=eq.f", False, True),
        ("public=lt.true", False, True),
        ("public=is.true", True, True),
        ("public=is.false", True, False),
        (
            "id=eq.{6F9619FF-8B86-D011-B42D-00C04FC964FF}",
            "6f9619ff-8b86-d011-b42d-00c04fc964ff",
            True,
        ),
        ("created_at=eq.2026-01-01T05:30:00+05:30", "2026-01-01T00:00:00+00:00", True),
        ("created_at=gt.2026-01-01", "2026-01-01T00:00:00.000001+00:00", True),
        ("created_at=lt.2026-01-01T00:00:00Z", "2025-12-31T23:59:59.999999+00:00", True),
        ("created_at=lt.0001-01-01T00:00:00Z", "0044-03-15T10:09:21+00:09:21 BC", True),
        ("created_at=gt.294000-01-01T00:00:00Z", "294276-12-31T23:59:59.999999+00:00", True),
        ("created_at=lt.infinity", "2026-01-01T00:00:00+00:00", True),
        ("created_at=gt.294276-12-31T23:59:59.999999Z", "infinity", True),
        ("created_at=gt.-infinity", "-infinity", False),
        ("local_at=eq.2026-01-01 12:00", "2026-01-01T12:00:00", True),
        ("due=eq.2026-02-28", "2026-02-28", True),
        ("due=lt.0001-01-01", "0001-12-31 BC", True),
    ],
)
def test_each_operator_compares_as_the_column_type(param, value, expected):
    column = param.split("=")[0]
    assert matches(param, **{column: value}) is expected


def test_not_negates_an_operator_and_null_matches_neither():
    assert matches("status=not.eq.failed", status="ready")
    assert not matches("status=not.eq.failed", status="failed")
    for param in ("status=eq.failed", "status=not.eq.failed", "status=not.in.(a,b)"):
        assert not matches(param, status=None), param
    assert not matches("filename=not.like.*", filename=None)
    assert matches("status=is.null", status=None)
    assert not matches("status=not.is.null", status=None)
    assert matches("status=not.is.null", status="")
    assert matches("public=not.is.true", public=None)  # IS NOT TRUE holds for NULL


def test_filters_and_together_even_on_one_column():
    shape = shaped("progress=gte.10", "progress=lt.50")
    assert [p for p in range(100) if shape.matches({"progress": p})] == list(range(10, 50))


def test_in_takes_double_quoted_values_with_commas_parentheses_and_escapes():
    shape = shaped('status=in.("a,b",c,"(d)","say \\"hi\\"","",back\\slash)')
    for value in ("a,b", "c", "(d)", 'say "hi"', "", "back\\slash"):
        assert shape.matches({"status": value}), value
    assert not shape.matches({"status": "a"})


def test_like_takes_star_as_its_only_wildcard():
    assert matches("filename=like.100%", filename="100%")
    assert not matches("filename=like.100%", filename="1000")
    assert not matches("filename=like.a_c", filename="abc")
    assert matches("filename=like.*a*b*", filename="xxaxxbxx")
    assert not matches("filename=like.*a*b*", filename="xxbxxaxx")
    assert matches("filename=like.a*a", filename="a") is False
    long = "a" * 50_000 + "b"
    assert not matches("filename=like." + "*a" * 100 + "*c", filename=long)  # no backtracking


def test_ilike_folds_case_as_postgres_lower_in_a_utf8_locale():
    assert matches("filename=ilike.*émile*", filename="À ÉMILE")
    assert matches("filename=ilike.ΟΔΟΣ", filename="οδοσ")  # the plain small sigma, not the final
    assert not matches("filename=ilike.ΟΔΟΣ", filename="οδος")
    assert matches("filename=ilike.istanbul", filename="İSTANBUL")
    assert not matches("filename=ilike.STRASSE", filename="straße")


def test_a_row_decoded_without_decimal_still_matches():
    row = json.loads('{"ratio": 0.1, "weight": 1e300, "score": 0.1}')
    assert shaped("ratio=eq.0.1", "weight=eq.1e300", "score=eq.0.1").matches(row)
    assert shaped("ratio=eq.1.10").matches(load_row('{"ratio": 1.1}'))


def test_a_row_value_not_of_the_column_type_matches_nothing():
    for param in ("progress=eq.1", "progress=not.eq.1", "created_at=gt.2026-01-01"):
        column = param.split("=")[0]
        assert not matches(param, **{column: "not a value"})
    assert not matches("progress=eq.1", progress=True)


@pytest.mark.parametrize(
    ("param", "words"),
    [
        ("nope=eq.1", ['unknown column "nope"', "progress"]),
        ("tags=eq.a", ['"tags"', "text[]", "cannot be filtered"]),
        ("meta=is.null", ['"meta"', "jsonb", "cannot be filtered"]),
        ("status=failed", ['"status=failed"', "no operator", "status=eq.failed"]),
        ("status=equals.failed", ['unknown operator "equals"', "eq, neq"]),
        ("status=not.not.eq.x", ['unknown operator "not"']),
        ("progress=eq.abc", ['"progress=eq.abc"', '"abc" is not an integer']),
        ("progress=eq.1.5", ['"1.5" is not an integer']),
        ("progress=eq.٣", ['"٣" is not an integer']),
        ("progress=gt.2147483648", ['"2147483648" is out of range for integer']),
        ("size=eq.9223372036854775808", ["out of range for bigint"]),
        ("ratio=eq.1,5", ['"1,5" is not a number']),
        ("ratio=eq.1e131072", ["out of range for numeric"]),
        ("score=eq.1e39", ['"1e39" is out of range for real']),
        ("weight=eq.1e-400", ["out of range for double precision"]),
        ("id=eq.123", ['"123" is not a UUID']),
        ("public=eq.maybe", ['"maybe" is not a boolean']),
        ("public=is.maybe", ["is takes null, true or false", '"maybe"']),
        ("progress=is.true", ["is.true applies to boolean columns", "progress is integer"]),
        ("progress=like.1*", ["like applies to text columns", "progress is integer"]),
        ("id=ilike.a*", ["ilike applies to text columns", "id is uuid"]),
        ("created_at=gt.yesterday", ['"yesterday" is not a timestamp with time zone', "ISO"]),
        ("created_at=gt.2026-01-01T00:00:00 05:00", ["send + as %2B"]),
        ("created_at=gt.2026-02-30", ['"2026-02-30" is not a valid date']),
        ("created_at=gt.2026-01-01T24:00", ["not a valid date or time"]),
        ("created_at=gt.2026-01-01T00:00+16:00", ["offset out of range"]),
        ("created_at=gt.294277-01-01T00:00Z", ["out of range for timestamp with time zone"]),
        ("created_at=gt.2026-01-01T00:00:00.1234567Z", ["is not a timestamp"]),
        ("local_at=gt.2026-01-01T00:00Z", ["time zone offset", "timestamp without time zone"]),
        ("due=eq.2026-01-01T10:00", ['"2026-01-01T10:00" is not a date']),
        ("due=eq.0000-01-01", ["not a valid date"]),
        ("status=eq.a\x00b", ["NUL"]),
        ("status=in.()", ["in.() needs at least one value"]),
        ("status=in.a,b", ["in takes a list in parentheses", '"a,b"']),
        ("status=in.(a,(b))", ["parenthesis", "double quotes"]),
        ('status=in.("a"b)', ["followed by more than a comma"]),
        ('status=in.("a)', ["no closing quote"]),
        ("progress=in.(1,x)", ['"x" is not an integer']),
        ("select=", ["empty column"]),
        ("select=id,,status", ["empty column"]),
        ("select=id,owner", ['unknown column "owner"']),
    ],
)
def test_an_invalid_filter_is_refused_with_a_message_naming_it(param, words):
    with pytest.raises(InvalidFilter) as refused:
        shaped(param)
    assert refused.value.status == 400 and refused.value.code == "INVALID_FILTER"
    for word in words:
        assert word in refused.value.message, (word, refused.value.message)


def test_limits_are_told_in_the_refusal():
    with pytest.raises(InvalidFilter, match="at most 20 filters"):
        shaped(*(f"progress=neq.{i}" for i in range(21)))
    with pytest.raises(InvalidFilter, match="at most 100 values, not 101"):
        shaped("progress=in.(" + ",".join(map(str, range(101))) + ")")
    with pytest.raises(InvalidFilter, match=f"at most {MAX_VALUE} characters"):
        shaped("status=eq." + "x" * (MAX_VALUE + 1))
    with pytest.raises(InvalidFilter, match="select may be given once"):
        shaped("select=id", "select=status")
    assert shaped(*(f"progress=neq.{i}" for i in range(20)), "snapshot=1").filters


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (["status=eq.a", "progress=gt.1"], ["progress=gt.1", "status=eq.a"]),
        (["status=in.(b,a,a)"], ['status=in.("a",b)']),
        (["progress=eq.007"], ["progress=eq.+7"]),
        (["ratio=eq.1.50"], ["ratio=eq.15e-1"]),
        (["public=eq.t"], ["public=eq.TRUE"]),
        (["created_at=gt.2026-01-01T05:30+05:30"], ["created_at=gt.2026-01-01 00:00:00Z"]),
        (["created_at=gt.2026-01-01"], ["created_at=gt.2026-01-01T00:00:00.000000+00"]),
        (
            ["id=eq.6F9619FF8B86D011B42D00C04FC964FF"],
            ["id=eq.6f9619ff-8b86-d011-b42d-00c04fc964ff"],
        ),
        (["status=eq.a", "status=eq.a"], ["status=eq.a"]),
        (["select=status,id"], ["select=version,status,status"]),
        (["select=*"], []),
        (["snapshot=1", "status=is.NULL"], ["status=is.null"]),
    ],
)
def test_the_key_is_the_same_however_a_shape_is_written(one, other):
    assert shaped(*one) == shaped(*other)
    assert shaped(*one).key == shaped(*other).key
    assert hash(shaped(*one)) == hash(shaped(*other))


def test_different_shapes_have_different_keys():
    shapes = [
        [],
        ["status=eq.a"],
        ["status=neq.a"],
        ["status=not.eq.a"],
        ["status=eq.A"],
        ["status=like.a"],
        ["status=in.(a)"],
        ["status=in.(a,b)"],
        ['status=in.("a,b")'],
        ["file_type=eq.a"],
        ["status=eq.a", "select=status"],
        ["select=status"],
        ["select=filename"],
        ["progress=gt.1"],
        ["progress=gte.1"],
    ]
    keys = [shaped(*params).key for params in shapes]
    assert len(set(keys)) == len(keys)
    assert all(len(key) == 16 for key in keys[1:])


def test_the_canonical_form_reads_back_to_the_same_shape():
    shape = shaped(
        'status=in.("a,b",c,"q\\"&x","")',
        "filename=ilike.*ÉMILE & co*",
        "created_at=gte.2026-01-01T00:00:00+05:30",
        "ratio=not.eq.NaN",
        "select=status,filename",
    )
    assert parse_shape(parse_qsl(shape.canonical, keep_blank_values=True), FILES) == shape
    assert "created_at=gte.2025-12-31T18:30:00%2B00:00" in shape.canonical


def test_select_sends_the_listed_columns_id_and_version_in_the_rows_order():
    row = {"id": "x", "filename": "a.pdf", "status": "ready", "progress": 100, "version": 7}
    assert list(shaped("select=progress,status").project(row)) == [
        "id",
        "status",
        "progress",
        "version",
    ]
    assert shaped("select=*").project(row) == row
    assert shaped("status=eq.ready").project(row) == row


def test_where_numbers_its_parameters_from_first_param_and_qualifies_columns():
    sql, params = shaped("status=in.(a,b)", "progress=not.gte.5", "filename=like.*%*").where(
        3, alias="r"
    )
    assert sql == (
        '(r."filename" collate "C" like $3::text)'
        ' and not (r."progress" >= $4::text::integer)'
        ' and (r."status" = any($5::text[]))'
    )
    assert params == ["%\\%%", "5", ["a", "b"]]
    assert shaped("status=lt.b").where() == ('("status" collate "C" < $1::text)', ["b"])


# The property: over random rows of every type a filter takes, and random shapes of every
# operator, `matches` on each row's to_jsonb agrees with Postgres on `where`; and each
# shape's canonical form reads back to it.

TABLE = {
    "id": "bigint",
    "t": "text",
    "vc": "character varying",
    "i2": "smallint",
    "i4": "integer",
    "i8": "bigint",
    "n": "numeric",
    "f4": "real",
    "f8": "double precision",
    "b": "boolean",
    "u": "uuid",
    "tz": "timestamp with time zone",
    "ts": "timestamp without time zone",
    "dt": "date",
}
CHARS = "aAbBzZ é É ß Σσς İi \N{LATIN SMALL LETTER DOTLESS I} ǅ 日 😀 % _ * \\ , ( ) \" ' . - \t"
WORDS = ["", "a", "A", "ab", "AB", "Émile", "ÉMILE", "émile", "ΟΔΟΣ", "οδος", "οδοσ",
         "İstanbul", "istanbul", "straße", "STRASSE", "100%", "100_", "a_b", "a%b", "a*b",
         "back\\slash", 'say "hi"', "a,b", "(a)", "日本語", "😀", "z", "zz"]  # fmt: skip
UUIDS = [str(uuid.UUID(int=i * 0x1111111111111111)) for i in range(1, 6)]
EXTREME_MOMENTS = {
    "tz": ["4714-11-24 00:00:00+00 BC", "294276-12-31 23:59:59.999999+00", "infinity",
           "-infinity", "0044-03-15 12:00:00+02 BC", "1883-11-18 12:00:00-05"],
    "ts": ["4714-11-24 00:00:00 BC", "294276-12-31 23:59:59.999999", "infinity", "-infinity",
           "0001-01-01 00:00:00 BC"],
    "dt": ["4714-11-24 BC", "5874897-12-31", "infinity", "-infinity", "0001-12-31 BC"],
}  # fmt: skip
NUMERICS = ["0", "-0", "1.50", "1.5", "0.1", "NaN", "Infinity", "-Infinity", "1e-30",
            "123456789012345678901234567890.123456789"]  # fmt: skip
FLOATS = {
    kind: ["0", "-0", "0.1", "NaN", "Infinity", "-Infinity", top, "-" + top, tiny, "16777217"]
    for kind, top, tiny in [("real", "3.4028234e38", "1e-45"),
                            ("double precision", "1.7976931348623157e308", "5e-324")]
}  # fmt: skip
INTEGER_BITS = {"i2": 16, "i4": 32, "i8": 64, "id": 64}


def random_text(rng: random.Random) -> str:
    if rng.random() < 0.6:
        return rng.choice(WORDS)
    return "".join(rng.choice(CHARS) for _ in range(rng.randrange(6)))


def random_moment(rng: random.Random, column: str) -> str:
    if rng.random() < 0.1:
        return rng.choice(EXTREME_MOMENTS[column])
    # A few instants, so that rows share them, each written with an offset of its own.
    base = dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(hours=rng.randrange(-5, 5))
    moment = base + dt.timedelta(microseconds=rng.choice([0, 1, -1, 500_000]))
    if rng.random() < 0.3:
        moment += dt.timedelta(days=rng.randrange(-60_000, 60_000))
    if column == "dt":
        return moment.date().isoformat()
    if column == "ts":
        return moment.replace(tzinfo=None).isoformat(sep=rng.choice("T "))
    offset = dt.timezone(dt.timedelta(minutes=rng.choice([0, 330, -210, 345, -600, 840])))
    return moment.astimezone(offset).isoformat()


def random_value(rng: random.Random, column: str) -> str:
    """A value of the column's type, as text Postgres reads."""
    kind = TABLE[column]
    if column in INTEGER_BITS:
        top = 2 ** (INTEGER_BITS[column] - 1)
        edges = [-top, top - 1, 0, 1, -1, rng.randrange(-5, 5), rng.randrange(-top, top)]
        return str(rng.choice(edges))
    if kind in ("text", "character varying"):
        return random_text(rng)
    if kind == "numeric":
        scaled = Decimal(rng.randrange(-(10**6), 10**6)).scaleb(-rng.randrange(4))
        return rng.choice([*NUMERICS, str(scaled)])
    if kind in ("real", "double precision"):
        return rng.choice([*FLOATS[kind], repr(rng.uniform(-100, 100)), str(rng.randrange(-5, 5))])
    if kind == "boolean":
        return rng.choice(["true", "false"])
    if kind == "uuid":
        return rng.choice(UUIDS)
    return random_moment(rng, column)


def near(rng: random.Random, column: str, value: Any) -> str:
    """A filter's value from a row's: itself, or one just beside it."""
    if isinstance(value, bool):
        return rng.choice(["true", "false", "t", "f"])
    if isinstance(value, int) and column in INTEGER_BITS:
        return str(value + rng.choice([0, 0, 1, -1]))
    if isinstance(value, Decimal | int) and TABLE[column] == "numeric":
        return str(value + rng.choice([Decimal(0), Decimal(0), Decimal("0.001"), Decimal(-1)]))
    if isinstance(value, Decimal | int):
        number = float(value)
        return repr(rng.choice([number, number, math.nextafter(number, math.inf)]))
    if isinstance(value, str) and TABLE[column] in ("text", "character varying"):
        return rng.choice([value, value, value.swapcase(), value[:-1], value + "a"])
    return str(value)


def pattern(rng: random.Random, text: str) -> str:
    """A like pattern that a row's text may match: parts of it between stars."""
    if not text or rng.random() < 0.1:
        return rng.choice(["*", "", "a*", "*%*", "*_*"])
    i, j = sorted(rng.randrange(len(text) + 1) for _ in range(2))
    choice = rng.choice([text, text[:i] + "*", "*" + text[j:], "*" + text[i:j] + "*",
                         text[:i] + "*" + text[j:], "*" + "*".join(text) + "*"])  # fmt: skip
    return choice.swapcase() if rng.random() < 0.3 else choice


def in_list(values: list[str], rng: random.Random) -> str:
    def written(value: str) -> str:
        plain = value and not set(value) & set(',()"\\') and rng.random() < 0.7
        return value if plain else '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    return "(" + ",".join(map(written, values)) + ")"


def random_filter(rng: random.Random, rows: list[dict[str, Any]]) -> tuple[str, str]:
    column = rng.choice(list(TABLE))
    kind = KINDS[TABLE[column]]
    operators = ["eq", "neq", "lt", "lte", "gt", "gte", "in", "is"]
    operators += ["like", "ilike"] * 2 if kind.text else []

    def value() -> str:
        seen = rng.choice(rows)[column]
        if seen is None or rng.random() < 0.2:
            return random_value(rng, column)
        return near(rng, column, seen)

    op = rng.choice(operators)
    if op == "is":
        written = rng.choice(["null", "true", "false"] if kind.name == "boolean" else ["null"])
    elif op == "in":
        written = in_list([value() for _ in range(rng.randrange(1, 5))], rng)
    elif op in ("like", "ilike"):
        seen = rng.choice(rows)[column]
        written = pattern(rng, seen if isinstance(seen, str) else random_text(rng))
    else:
        written = value()
    return column, ("not." if rng.random() < 0.3 else "") + op + "." + written


async def make_table(db: asyncpg.Connection, rng: random.Random, count: int) -> None:
    types = ", ".join(f"{name} {kind}" for name, kind in TABLE.items() if name != "id")
    await db.execute(f"create temp table shaped (id bigint primary key, {types})")
    names = [name for name in TABLE if name != "id"]
    casts = ", ".join(f"${i + 2}::text::{TABLE[name]}" for i, name in enumerate(names))
    insert = f"insert into shaped (id, {', '.join(names)}) values ($1, {casts})"
    await db.executemany(
        insert,
        [
            (i, *(None if rng.random() < 0.15 else random_value(rng, name) for name in names))
            for i in range(1, count + 1)
        ],
    )


async def test_matches_agrees_with_postgres_on_random_shapes(db: asyncpg.Connection):
    """The database renders rows in a time zone of odd offsets (and local mean time before
    1883): `matches` reads any offset, and `where` never depends on the session's zone."""
    rng = random.Random(23)
    await db.execute("set timezone = 'America/St_Johns'")
    await make_table(db, rng, 300)
    rows = [
        load_row(text)
        for text in await db.fetchval("select array_agg(to_jsonb(r)::text) from shaped r")
    ]
    everyone = {row["id"] for row in rows}
    tried, narrowed, refused = 0, 0, 0
    while tried < 500:
        params = [random_filter(rng, rows) for _ in range(rng.choice([1, 1, 2, 2, 3]))]
        try:
            shape = parse_shape(params, TABLE)
        except InvalidFilter:
            refused += 1  # a value beside a row's that the type cannot hold (max + 1)
            continue
        tried += 1
        first = rng.randrange(1, 4)
        sql, values = shape.where(first, alias=rng.choice([None, "r"]))
        padding = "".join(f"${i}::int = {i} and " for i in range(1, first))
        query = f"select coalesce(array_agg(id), '{{}}') from shaped r where {padding}({sql})"
        in_sql = set(await db.fetchval(query, *range(1, first), *values))
        in_python = {row["id"] for row in rows if shape.matches(row)}
        assert in_python == in_sql, (params, shape.canonical, sql, values)
        assert parse_shape(parse_qsl(shape.canonical, keep_blank_values=True), TABLE) == shape
        assert parse_shape(params[::-1], TABLE).key == shape.key
        narrowed += 0 < len(in_sql) < len(everyone)
    assert narrowed > 250 and refused < 50, (narrowed, refused)
