"""The cases that decoding the rows from the WAL brings (STREAMER_SOURCE=wal reads the feed
tables' own row changes), held with either source: whatever way a change travels, a
stream gets the row exactly as Postgres renders it in JSON, written by a role that is not
the table's owner.

- a 1 MB TOASTed column that an UPDATE leaves unchanged (not in the WAL: read back);
- a change of owner (the old owner's delete comes from the tombstone, no old row needed);
- types not rendered natively (a range, numeric[], a composite, a domain, an enum, money,
  interval), and ones that are, at their edges: the row as `streamer.<feed>_row` renders it;
- a column added, and one dropped, under open streams;
- TRUNCATE of two feed tables in one statement.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg

from streamer.auth import mint_token
from tests.client import open_stream
from tests.conftest import SECRET, WRITER, Service, insert_file, token_for
from tests.test_any_table import enable_feed

EVENTS = "/api/files/events"
MEGABYTE = "é" * 2**19  # 1 MiB of UTF-8, TOASTed (compressed, then out of line)

THINGS = """
    create type things_point as (x integer, label text);
    create domain things_percent as integer check (value between 0 and 100);
    create type things_state as enum ('new', 'done');
    create table things (
        id        bigint generated always as identity primary key,
        owner_id  text not null,
        span      int4range,
        amounts   numeric[],
        spot      things_point,
        percent   things_percent,
        state     things_state,
        price     money,
        took      interval,
        tags      text[],
        ratio     double precision,
        big       numeric,
        at        timestamptz,
        day       date,
        doc       jsonb,
        raw       json,
        ok        boolean,
        code      char(4)
    );
    grant select, insert, update, delete on things to {writer};
"""


def files_of(service: Service, user: uuid.UUID) -> Any:
    """A stream with its snapshot first: a change made before it is in the snapshot, never
    after it (one may still be on its way to the service when a plain stream opens)."""
    return open_stream(
        service.session, service.url(EVENTS), token_for(user), params={"snapshot": "1"}
    )


async def test_a_megabyte_column_an_update_leaves_unchanged_still_arrives_whole(
    service: Service, db: asyncpg.Connection, user: uuid.UUID
) -> None:
    file_id = await insert_file(db, user, "big.log", error_message=MEGABYTE)
    async with files_of(service, user) as stream:
        await db.execute("update files set progress = 42 where id = $1", file_id)
        while (event := await stream.next()).file["progress"] != 42:
            pass
        assert event.file["error_message"] == MEGABYTE
        # And a change of that column itself travels too.
        await db.execute("update files set error_message = $2 where id = $1", file_id, "short")
        while (event := await stream.next()).file["error_message"] != "short":
            pass


async def test_a_change_of_owner_is_a_delete_for_the_old_one_and_an_update_for_the_new(
    service: Service, db: asyncpg.Connection, user: uuid.UUID, other_user: uuid.UUID
) -> None:
    file_id = await insert_file(db, user, "handed-over.pdf")
    async with files_of(service, user) as old, files_of(service, other_user) as new:
        assert [e.name for e in old.events] == ["file-update", "synced"]
        assert [e.name for e in new.events] == ["synced"]
        await db.execute("update files set user_id = $2 where id = $1", file_id, other_user)
        gone = await old.next()
        assert (gone.name, gone.file) == ("file-deleted", {"id": str(file_id)})
        arrived = await new.next()
        assert (arrived.name, arrived.file["id"]) == ("file-update", str(file_id))
        # Back again, and deleted by its owner: each stream ends right.
        await db.execute("update files set user_id = $2 where id = $1", file_id, user)
        await db.execute("delete from files where id = $1", file_id)
        assert [(e.name, e.file["id"]) for e in [await new.next()]] == [
            ("file-deleted", str(file_id))
        ]
        back, deleted = await old.next(), await old.next()
        assert (back.name, deleted.name) == ("file-update", "file-deleted")


async def test_types_not_rendered_natively_arrive_as_postgres_renders_them(
    service: Service, owner_db: asyncpg.Connection, db: asyncpg.Connection
) -> None:
    await owner_db.execute(THINGS.format(writer=WRITER))
    await enable_feed(owner_db, service, "things", "owner_id", event="thing")
    url = service.url("/api/things/events")
    sub = "team|7"  # an owner column of text
    async with open_stream(service.session, url, mint_token(SECRET, sub, 3600)) as stream:
        rows = [
            # Every column NULL, then edges of each type.
            {},
            {
                "span": "[3,7)", "amounts": "{1.50,NaN,-0.001}", "spot": '(4,"a ""b"", c")',
                "percent": "42", "state": "done", "price": "12.34", "took": "1 day 02:03:04.5",
                "tags": '{"x,y",NULL,"",é,"\\"q\\""}', "ratio": "1e-07", "big": "123456789.000",
                "at": "2026-02-28 23:59:59.999999+05:30", "day": "2024-02-29",
                "doc": '{"b": [1, 2.50, {"é": null}], "a": "\\u0001"}', "raw": '{"a":1,  "a":2}',
                "ok": "true", "code": "ab",
            },
            {"ratio": "-0", "big": "NaN", "at": "infinity", "tags": "{}", "amounts": "{}"},
        ]  # fmt: skip
        for values in rows:
            names = ["owner_id", *values]
            args = [sub, *values.values()]
            casts = ", ".join(f"${i + 1}::text::{type_of(n)}" for i, n in enumerate(names))
            thing_id = await db.fetchval(
                f"insert into things ({', '.join(names)}) values ({casts}) returning id", *args
            )
            event = await stream.next()
            expected = await owner_db.fetchval(
                "select streamer.things_row(t) from things t where id = $1", thing_id
            )
            assert event.json["thing"] == json.loads(expected), values
            assert event.json["thing"]["id"] == thing_id


def type_of(column: str) -> str:
    return {
        "owner_id": "text", "span": "int4range", "amounts": "numeric[]", "spot": "things_point",
        "percent": "things_percent", "state": "things_state", "price": "money",
        "took": "interval", "tags": "text[]", "ratio": "double precision", "big": "numeric",
        "at": "timestamptz", "day": "date", "doc": "jsonb", "raw": "json", "ok": "boolean",
        "code": "char(4)",
    }[column]  # fmt: skip


async def test_a_column_added_and_one_dropped_under_open_streams(
    service: Service, owner_db: asyncpg.Connection, db: asyncpg.Connection, user: uuid.UUID
) -> None:
    file_id = await insert_file(db, user, "evolving.pdf")
    async with files_of(service, user) as stream:
        await owner_db.execute("alter table files add column pages integer default 3")
        await db.execute("update files set progress = 10 where id = $1", file_id)
        while (event := await stream.next()).file["progress"] != 10:
            pass
        assert event.file["pages"] == 3
        await owner_db.execute("alter table files drop column file_type")
        await db.execute("update files set pages = 4, progress = 20 where id = $1", file_id)
        while (event := await stream.next()).file["progress"] != 20:
            pass
        assert event.file["pages"] == 4 and "file_type" not in event.file


async def test_a_truncate_of_two_feed_tables_at_once_resets_the_streams_of_both(
    service: Service, owner_db: asyncpg.Connection, db: asyncpg.Connection, user: uuid.UUID
) -> None:
    await owner_db.execute(
        "create table notes (id uuid primary key default gen_random_uuid(),"
        " owner_id uuid not null, body text);"
        f" grant select, insert, update, delete on notes to {WRITER}"
    )
    await enable_feed(owner_db, service, "notes", "owner_id", event="note")
    await insert_file(db, user, "doomed.pdf")
    await db.execute("insert into notes (owner_id, body) values ($1, 'doomed')", user)
    notes = open_stream(
        service.session,
        service.url("/api/notes/events"),
        token_for(user),
        params={"snapshot": "1"},
    )
    async with files_of(service, user) as files, notes as noted:
        await owner_db.execute("truncate files, notes")
        # Each starts over: reset, then a snapshot of nothing.
        assert [e.name for e in await files.until("synced")] == ["reset", "synced"]
        assert [e.name for e in await noted.until("synced")] == ["reset", "synced"]
