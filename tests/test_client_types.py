"""The browser client's TypeScript types say exactly what the server sends.

streamer-client.d.ts is written by hand; these tests read it and compare every event
interface (and the file inside) with the pydantic models in streamer/events.py, field by
field and type by type, so neither side can gain, lose or retype a field alone.
"""

from __future__ import annotations

import re
import types
import typing
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from uuid import UUID

import pytest
from pydantic import BaseModel, create_model

from streamer import events

DTS = Path(events.__file__).parent / "static" / "streamer-client.d.ts"
EVENT_MODELS: tuple[type[BaseModel], ...] = typing.get_args(events.Event)

# A TypeScript type, as the set of its union members: `string | null` is {"string", "null"}.
TsType = frozenset[str]


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


def json_name(model: type[BaseModel], name: str) -> str:
    field = model.model_fields[name]
    return field.serialization_alias or field.alias or name


def expected_members(annotation: object) -> TsType:
    """The TypeScript a field of this Python type must have, as union members."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return frozenset().union(*(expected_members(arg) for arg in typing.get_args(annotation)))
    if origin is typing.Literal:
        return frozenset(f'"{value}"' for value in typing.get_args(annotation))
    if annotation is type(None):
        return frozenset({"null"})
    if annotation in (str, UUID, datetime):  # a UUID and a datetime travel as JSON strings
        return frozenset({"string"})
    if annotation in (int, float):
        return frozenset({"number"})
    if annotation is bool:
        return frozenset({"boolean"})
    raise AssertionError(f"no TypeScript equivalent known for {annotation!r}")


def mismatches(model: type[BaseModel], interface: str, declarations: Declarations) -> list[str]:
    """Every way the interface differs from the model; nested models are compared too."""
    where = f"{interface} (model {model.__name__})"
    if interface not in declarations.interfaces:
        return [f"{where}: no such interface in {DTS.name}"]
    declared = declarations.interfaces[interface]
    # A field this reader cannot parse must not hide from the comparison.
    problems = [f"{where}: cannot read {line!r}" for line in declarations.unreadable[interface]]
    fields = {json_name(model, name): info.annotation for name, info in model.model_fields.items()}
    problems += [f"{where}: field {f!r} is not in the model" for f in declared.keys() - fields]
    problems += [f"{where}: field {f!r} is missing" for f in fields.keys() - declared.keys()]
    for name in sorted(fields.keys() & declared.keys()):
        ts, optional = declared[name]
        annotation = fields[name]
        if optional:
            problems.append(f"{where}: {name} is optional, but the server always sends it")
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            problems += mismatches(annotation, ts.strip(), declarations)
            continue
        got, want = declarations.members(ts), expected_members(annotation)
        if got != want:
            problems.append(
                f"{where}: {name} is {' | '.join(sorted(got))}, expected {' | '.join(sorted(want))}"
            )
    return problems


def event_type(model: type[BaseModel]) -> str:
    (value,) = typing.get_args(model.model_fields["eventType"].annotation)
    assert isinstance(value, str)
    return value


@pytest.fixture(scope="module")
def declarations() -> Declarations:
    return Declarations.parse(DTS.read_text())


@pytest.mark.parametrize("model", EVENT_MODELS, ids=lambda model: model.__name__)
def test_each_event_interface_has_exactly_the_fields_and_types_of_its_model(
    model: type[BaseModel], declarations: Declarations
):
    assert mismatches(model, model.__name__, declarations) == []


def test_the_streamed_file_interface_has_exactly_the_fields_and_types_of_the_model(
    declarations: Declarations,
):
    assert mismatches(events.StreamedFile, "StreamedFile", declarations) == []
    assert "StreamedFile" in declarations.interfaces["FileUpdateEvent"]["file"][0]


def test_the_event_map_names_every_event_the_server_sends_and_no_other(
    declarations: Declarations,
):
    event_map = declarations.interfaces["StreamEventMap"]
    assert {name: ts for name, (ts, _optional) in event_map.items()} == {
        event_type(model): model.__name__ for model in EVENT_MODELS
    }


def test_a_field_added_on_either_side_is_noticed(declarations: Declarations):
    # The comparison itself can fail: a field only in Python, or only in TypeScript.
    grown = create_model("StreamedFile", __base__=events.StreamedFile, checksum=(str, ...))
    assert mismatches(grown, "StreamedFile", declarations) == [
        "StreamedFile (model StreamedFile): field 'checksum' is missing"
    ]
    text = DTS.read_text().replace(
        "  version: number;\n", "  version: number;\n  owner_id: string;\n", 1
    )
    assert mismatches(events.StreamedFile, "StreamedFile", Declarations.parse(text)) == [
        "StreamedFile (model StreamedFile): field 'owner_id' is not in the model"
    ]
    split = DTS.read_text().replace("  version: number;\n", "  version:\n    number;\n", 1)
    assert mismatches(events.StreamedFile, "StreamedFile", Declarations.parse(split)) == [
        "StreamedFile (model StreamedFile): cannot read 'version:'",
        "StreamedFile (model StreamedFile): cannot read 'number;'",
        "StreamedFile (model StreamedFile): field 'version' is missing",
    ]
    retyped = DTS.read_text().replace("  error_message: string | null;", "  error_message: string;")
    assert mismatches(events.StreamedFile, "StreamedFile", Declarations.parse(retyped)) == [
        "StreamedFile (model StreamedFile): error_message is string, expected null | string"
    ]
