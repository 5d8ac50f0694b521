"""The browser client's TypeScript types say exactly what the server sends.

streamer-client.d.ts is written by hand; these tests read it and compare it, field by field
and type by type, with what defines each event: the pydantic models of the stream's own
events (streamer/sse.py), the `files` table for the file a `file-update` carries, and the
frames the server really builds for a row's events. Neither side can gain, lose or retype a
field alone.
"""

from __future__ import annotations

import json
import re
import types
import typing
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydantic import BaseModel, create_model

from streamer import sse as events
from streamer.changes import Row
from streamer.feeds import FILES

DTS = Path(events.__file__).parent / "static" / "streamer-client.d.ts"
EVENT_MODELS: tuple[type[events.Event], ...] = typing.get_args(events.Event)
# The row's events, by the interface that describes them.
ROW_EVENTS = {
    f"{FILES.event}-update": "FileUpdateEvent",
    f"{FILES.event}-deleted": "FileDeletedEvent",
}

# A TypeScript type, as the set of its union members: `string | null` is {"string", "null"}.
TsType = frozenset[str]
# A JSON object the server sends, as its fields' TypeScript types.
Fields = dict[str, TsType]

# How Postgres renders a column's type in JSON (to_jsonb), in TypeScript.
TS_OF_POSTGRES = {
    "uuid": "string",
    "text": "string",
    "timestamp with time zone": "string",
    "integer": "number",
    "bigint": "number",
}
# A text column whose values a check constraint lists: those, and any string a later
# migration may allow.
OPEN_STRING = "(string & {})"


@dataclass(frozen=True)
class Declarations:
    """What a .d.ts file declares: interfaces (field → (type, optional)) and type aliases."""

    interfaces: dict[str, dict[str, tuple[str, bool]]]
    aliases: dict[str, str]
    unreadable: dict[str, list[str]]  # interface → lines that are not a one-line field

    @classmethod
    def parse(cls, text: str) -> Declarations:
        text = re.sub(r"/\*.*?\*/", "", text, flags=re.DOTALL)
        text = re.sub(r"//[^\n]*", "", text)
        interfaces, unreadable = {}, {}
        for match in re.finditer(
            r"^(?:export\s+)?interface\s+(\w+)(?:<[^>]*>)?(?:\s+extends\s+[\w\s,]+)?\s*\{(.*?)^\}",
            text,
            flags=re.DOTALL | re.MULTILINE,
        ):
            fields, others = {}, []
            for line in match.group(2).splitlines():
                field = re.fullmatch(r'\s*(?:readonly\s+)?"?([\w-]+)"?(\?)?\s*:\s*(.+?);\s*', line)
                if field:
                    fields[field.group(1)] = (field.group(3), field.group(2) == "?")
                elif line.strip():
                    others.append(line.strip())
            interfaces[match.group(1)] = fields
            unreadable[match.group(1)] = others
        aliases = {
            m.group(1): m.group(2)
            for m in re.finditer(
                r"^export\s+type\s+(\w+)\s*=\s*(.+?);", text, flags=re.DOTALL | re.MULTILINE
            )
        }
        return cls(interfaces, aliases, unreadable)

    def members(self, ts: str) -> TsType:
        """The union members of a type, with aliases (`FileStatus`) replaced by what they name."""
        result: set[str] = set()
        for member in (part.strip() for part in ts.split("|")):
            if member in self.aliases:
                result |= self.members(self.aliases[member])
            else:
                result.add(member)
        return frozenset(result)


def show(ts: TsType) -> str:
    return " | ".join(sorted(ts))


def mismatches(
    expected: Fields, source: str, interface: str, declarations: Declarations
) -> list[str]:
    """Every way the interface differs from the fields `source` defines."""
    if interface not in declarations.interfaces:
        return [f"{interface}: no such interface in {DTS.name}"]
    declared = declarations.interfaces[interface]
    # A field this reader cannot parse must not hide from the comparison.
    problems = [f"{interface}: cannot read {line!r}" for line in declarations.unreadable[interface]]
    problems += [f"{interface}: field {f!r} is not in {source}" for f in declared.keys() - expected]
    problems += [f"{interface}: field {f!r} is missing" for f in expected.keys() - declared]
    for name in sorted(expected.keys() & declared.keys()):
        ts, optional = declared[name]
        if optional:
            problems.append(f"{interface}: {name} is optional, but the server always sends it")
        got, want = declarations.members(ts), expected[name]
        if got != want:
            problems.append(f"{interface}: {name} is {show(got)}, expected {show(want)}")
    return problems


# -- what each side of the comparison says -------------------------------------------


def ts_of_python(annotation: object) -> TsType:
    """The TypeScript a field of this Python type must have, as union members."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return frozenset().union(*(ts_of_python(arg) for arg in typing.get_args(annotation)))
    if origin is typing.Literal:
        return frozenset(json.dumps(value) for value in typing.get_args(annotation))
    if annotation is type(None):
        return frozenset({"null"})
    if annotation in (str, datetime):  # a datetime travels as a JSON string
        return frozenset({"string"})
    if annotation in (int, float):
        return frozenset({"number"})
    if annotation is bool:
        return frozenset({"boolean"})
    raise AssertionError(f"no TypeScript equivalent known for {annotation!r}")


def model_fields(model: type[BaseModel]) -> Fields:
    return {
        info.serialization_alias or info.alias or name: ts_of_python(info.annotation)
        for name, info in model.model_fields.items()
    }


def table_fields(database_url: str) -> Fields:
    """The `files` table's columns as a stream sends them: all but the owner column."""
    with psycopg.connect(database_url) as conn:
        columns = conn.execute(
            "select column_name, data_type, is_nullable = 'YES' from information_schema.columns"
            " where table_schema = current_schema() and table_name = %s and column_name <> %s",
            (FILES.name, FILES.owner_column),
        ).fetchall()
        checks = conn.execute(
            "select a.attname, pg_get_constraintdef(c.oid) from pg_constraint c"
            " join pg_attribute a on a.attrelid = c.conrelid and a.attnum = c.conkey[1]"
            " where c.conrelid = %s::regclass and c.contype = 'c' and cardinality(c.conkey) = 1",
            (FILES.name,),
        ).fetchall()
    # `status in ('pending', ...)` reads back as `status = ANY (ARRAY['pending'::text, ...])`.
    known: dict[str, list[str]] = {}
    for column, check in checks:
        listed = re.search(r"= ANY \(ARRAY\[(.*)\]\)", check)
        if listed:
            known[column] = re.findall(r"'((?:[^']|'')*)'::text", listed.group(1))
    fields: Fields = {}
    for column, data_type, nullable in columns:
        if data_type == "text" and column in known:
            ts = {json.dumps(value.replace("''", "'")) for value in known[column]} | {OPEN_STRING}
        elif data_type in TS_OF_POSTGRES:
            ts = {TS_OF_POSTGRES[data_type]}
        else:
            raise AssertionError(f"no TypeScript equivalent known for {column} {data_type}")
        # The feed's own column travels as "version" (an app's `version` is not sent).
        sent_as = "version" if column == "streamer_version" else column
        fields[sent_as] = frozenset(ts | {"null"} if nullable else ts)
    return fields


def ts_of_json(value: object) -> TsType:
    """The union members that accept a JSON value the server sent."""
    if value is None:
        return frozenset({"null"})
    if isinstance(value, bool):
        return frozenset({"boolean"})
    if isinstance(value, int | float):
        return frozenset({"number"})
    if isinstance(value, str):
        return frozenset({"string", OPEN_STRING, json.dumps(value)})
    raise AssertionError(f"no TypeScript equivalent known for {value!r}")


def sent_mismatches(value: Any, ts: str, where: str, declarations: Declarations) -> list[str]:
    """Every way a JSON value the server sent differs from a TypeScript type."""
    interface = declarations.interfaces.get(ts.strip())
    if interface is None:
        if ts_of_json(value) & declarations.members(ts):
            return []
        return [f"{where} is {value!r}, not {ts}"]
    if not isinstance(value, dict):
        return [f"{where} is {value!r}, not an object ({ts})"]
    problems = [f"{where}.{key} is sent but not in {ts}" for key in value.keys() - interface]
    problems += [f"{where}.{key} is in {ts} but not sent" for key in interface.keys() - value]
    for key in sorted(value.keys() & interface.keys()):
        problems += sent_mismatches(value[key], interface[key][0], f"{where}.{key}", declarations)
    return problems


def sent(frame: bytes) -> tuple[str, Any]:
    """The event name and the data of one SSE message, as a browser's EventSource reads it."""
    lines = dict(line.split(": ", 1) for line in frame.decode().splitlines() if line)
    return lines["event"], json.loads(lines["data"])


def a_files_row(database_url: str) -> Row:
    """A row of `files` as a stream sends it, every nullable column filled."""
    row_id = str(uuid.uuid4())
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "insert into files (id, user_id, filename, file_type, status, progress,"
            " processing_stage, error_message) values (%s, gen_random_uuid(), 'report.pdf',"
            " 'pdf', 'processing', 50, 'compression', 'disk full')",
            (row_id,),
        )
        record = conn.execute(
            "select user_id::text, streamer_version, streamer.files_row(f) from files f"
            " where id = %s",
            (row_id,),
        ).fetchone()
    assert record is not None
    owner, version, rendered = record
    return Row(owner, row_id, version, rendered, terminal=False)


def event_type(model: type[BaseModel]) -> str:
    (value,) = typing.get_args(model.model_fields["eventType"].annotation)
    assert isinstance(value, str)
    return value


@pytest.fixture(scope="module")
def declarations() -> Declarations:
    return Declarations.parse(DTS.read_text())


# -- the tests ------------------------------------------------------------------------


@pytest.mark.parametrize("model", EVENT_MODELS, ids=lambda model: model.__name__)
def test_each_stream_event_interface_has_exactly_the_fields_and_types_of_its_model(
    model: type[BaseModel], declarations: Declarations
):
    source = f"model {model.__name__}"
    assert mismatches(model_fields(model), source, model.__name__, declarations) == []


def test_the_streamed_file_interface_has_exactly_the_columns_and_types_of_the_files_table(
    database_url: str, declarations: Declarations
):
    fields = table_fields(database_url)
    assert mismatches(fields, "table files", "StreamedFile", declarations) == []


def test_every_frame_the_server_builds_matches_the_interface_of_its_event_name(
    database_url: str, declarations: Declarations
):
    frames = [
        events.update_frame(FILES, a_files_row(database_url), "7"),
        events.deleted_frame(FILES, str(uuid.uuid4()), "7"),
        *(events.frame(model(timestamp=events.now())) for model in EVENT_MODELS),
    ]
    event_map = declarations.interfaces["StreamEventMap"]
    problems = []
    for name, data in map(sent, frames):
        assert data["eventType"] == name
        problems += sent_mismatches(data, event_map[name][0], name, declarations)
    assert problems == []


def test_the_event_map_names_every_event_the_server_sends_and_no_other(
    declarations: Declarations,
):
    event_map = declarations.interfaces["StreamEventMap"]
    assert {name: ts for name, (ts, _optional) in event_map.items()} == {
        event_type(model): model.__name__ for model in EVENT_MODELS
    } | ROW_EVENTS


def test_a_field_added_or_retyped_on_either_side_is_noticed(
    database_url: str, declarations: Declarations
):
    # The comparison itself can fail: a field only on the server's side, or only in TypeScript.
    grown = create_model("HeartbeatEvent", __base__=events.HeartbeatEvent, checksum=(str, ...))
    assert mismatches(model_fields(grown), "model", "HeartbeatEvent", declarations) == [
        "HeartbeatEvent: field 'checksum' is missing"
    ]
    table = table_fields(database_url)

    def streamed_file(text: str) -> list[str]:
        return mismatches(table, "table files", "StreamedFile", Declarations.parse(text))

    dts = DTS.read_text()
    assert streamed_file(
        dts.replace("  version: number;\n", "  version: number;\n  owner_id: string;\n", 1)
    ) == ["StreamedFile: field 'owner_id' is not in table files"]
    assert streamed_file(dts.replace("  version: number;\n", "  version:\n    number;\n", 1)) == [
        "StreamedFile: cannot read 'version:'",
        "StreamedFile: cannot read 'number;'",
        "StreamedFile: field 'version' is missing",
    ]
    assert streamed_file(
        dts.replace("  error_message: string | null;", "  error_message: string;")
    ) == ["StreamedFile: error_message is string, expected null | string"]
    # A status type closed to values a migration adds is noticed too.
    assert streamed_file(dts.replace(f" | {OPEN_STRING};", ";", 1)) == [
        'StreamedFile: status is "failed" | "pending" | "processing" | "ready", expected'
        ' "failed" | "pending" | "processing" | "ready" | (string & {})'
    ]


def test_a_column_added_to_the_table_is_noticed_in_its_columns_and_in_the_frames(
    database_url: str, declarations: Declarations
):
    with psycopg.connect(database_url) as conn:
        conn.execute("alter table files add column checksum text")
    assert mismatches(table_fields(database_url), "table files", "StreamedFile", declarations) == [
        "StreamedFile: field 'checksum' is missing"
    ]
    name, data = sent(events.update_frame(FILES, a_files_row(database_url), "7"))
    assert sent_mismatches(data, "FileUpdateEvent", name, declarations) == [
        "file-update.file.checksum is sent but not in StreamedFile"
    ]
