"""Shaped streams over HTTP (SPEC.md, "Shaped streams: filters and columns"): a stream holds
exactly the caller's rows its filters take, with the columns it selects; rows move in and
out as they change; snapshots, resumes and recoveries honour the shape, and a cursor
belongs to its shape. Both sources (the suite runs once with each)."""

from __future__ import annotations

import random
import uuid
from typing import Any
from urllib.parse import parse_qsl

import asyncpg

from streamer import keys
from streamer.shapes import load_row, parse_shape
from tests.client import Stream, open_stream
from tests.conftest import Service, insert_file, kill_change_connection, token_for, wait_until

EVENTS = "/api/files/events"
IN_PROGRESS = {"status": "in.(pending,processing)"}


def apply(state: dict[str, dict[str, Any]], stream: Stream, start: int = 0) -> int:
    """What a client holds after the stream's events from `start` on; where it got to."""
    for event in stream.events[start:]:
        if event.name == "reset":
            state.clear()
        elif event.name == "file-update":
            state[event.file["id"]] = event.file
        elif event.name == "file-deleted":
            state.pop(event.file["id"], None)
    return len(stream.events)


async def expected(
    db: asyncpg.Connection, user: uuid.UUID, query: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """The caller's rows that the shape takes, as Postgres decides, with the columns it
    selects."""
    service_columns = await db.fetch(
        "select attname, format_type(atttypid, null) as type from pg_attribute"
        " where attrelid = 'files'::regclass and attnum > 0 and not attisdropped"
    )
    columns = {r["attname"]: r["type"] for r in service_columns if r["attname"] != "user_id"}
    shape = parse_shape(query.items(), columns)
    where, params = shape.where(2, alias="r")
    rows = await db.fetch(
        f"select streamer.files_row(r) as row from files r where r.user_id = $1 and {where}",
        user,
        *params,
    )
    found = {}
    for record in rows:
        row = shape.project(load_row(record["row"]))
        found[row["id"]] = row
    return found


async def holds(
    stream: Stream,
    want: dict[str, dict[str, Any]],
    state: dict[str, dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Wait until what the stream's client holds (from `state` on) is `want` (events, not
    sleeps); what it holds."""
    state = {} if state is None else state
    seen = 0

    def same() -> bool:
        nonlocal seen
        seen = apply(state, stream, seen)
        return {k: _plain(v) for k, v in state.items()} == {k: _plain(v) for k, v in want.items()}

    await wait_until(same)
    return state


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v) for k, v in row.items()}


async def test_a_filtered_stream_holds_exactly_the_rows_that_match(
    service: Service, db: asyncpg.Connection, user: uuid.UUID
) -> None:
    pending = await insert_file(db, user, "a.pdf")
    ready = await insert_file(db, user, "b.pdf", status="ready", progress=100)
    params = {**IN_PROGRESS, "snapshot": "1"}
    async with open_stream(
        service.session, service.url(EVENTS), token_for(user), params=params
    ) as s:
        snapshot = [e for e in s.events if e.name == "file-update"]
        assert [e.file["id"] for e in snapshot] == [str(pending)]
        # Out: it no longer matches.
        await db.execute("update files set status = 'ready' where id = $1", pending)
        gone = await s.next()
        assert (gone.name, gone.file) == ("file-deleted", {"id": str(pending)})
        # A row the client does not hold changes and still does not match: nothing is sent.
        # In: one that starts matching comes with its whole state.
        await db.execute("update files set progress = 99 where id = $1", pending)
        await db.execute("update files set status = 'processing' where id = $1", ready)
        back = await s.next()
        assert back.name == "file-update" and back.file["id"] == str(ready)
        assert (back.file["status"], back.file["progress"], back.file["filename"]) == (
            "processing",
            100,
            "b.pdf",
        )
        # Deleted while it matches: a delete; a row inserted that does not match: nothing.
        await insert_file(db, user, "c.pdf", status="failed")
        await db.execute("delete from files where id = $1", ready)
        assert (await s.next()).file == {"id": str(ready)}
        other = await insert_file(db, user, "d.pdf", status="processing")
        assert (await s.next()).file["id"] == str(other)


async def test_select_sends_only_those_columns_and_id_and_version(
    service: Service, db: asyncpg.Connection, user: uuid.UUID
) -> None:
    file_id = await insert_file(db, user, "a.pdf")
    params = {"select": "status,progress", "snapshot": "1"}
    async with open_stream(
        service.session, service.url(EVENTS), token_for(user), params=params
    ) as s:
        first = next(e for e in s.events if e.name == "file-update")
        assert set(first.file) == {"id", "version", "status", "progress"}
        await db.execute("update files set progress = 40 where id = $1", file_id)
        update = await s.next()
        assert set(update.file) == {"id", "version", "status", "progress"}
        assert update.file["progress"] == 40 and update.file["version"] > first.file["version"]


async def test_a_resume_under_the_same_shape_loses_nothing_and_another_shape_resets(
    service: Service, db: asyncpg.Connection, owner_db: asyncpg.Connection, user: uuid.UUID
) -> None:
    a = await insert_file(db, user, "a.pdf")
    b = await insert_file(db, user, "b.pdf", status="processing")
    params = {**IN_PROGRESS, "snapshot": "1"}
    url, token = service.url(EVENTS), token_for(user)
    async with open_stream(service.session, url, token, params=params) as s:
        state: dict[str, dict[str, Any]] = {}
        apply(state, s)
        cursor = s.last_id
    assert cursor is not None and "." in cursor
    # While away: one leaves the shape, one is deleted, one comes in, one is new.
    c = await insert_file(db, user, "c.pdf", status="failed")
    await db.execute("update files set status = 'ready' where id = $1", a)
    await db.execute("delete from files where id = $1", b)
    await db.execute("update files set status = 'pending' where id = $1", c)
    await insert_file(db, user, "d.pdf")
    async with open_stream(
        service.session, url, token, params=IN_PROGRESS, headers={"Last-Event-ID": cursor}
    ) as s:
        assert "reset" not in [e.name for e in s.events]
        apply(state, s)
        assert {k: _plain(v) for k, v in state.items()} == {
            k: _plain(v) for k, v in (await expected(owner_db, user, IN_PROGRESS)).items()
        }
    # The same cursor under another filter, or another select: reset, then that snapshot.
    for other in ({"status": "eq.failed"}, {**IN_PROGRESS, "select": "status"}, {}):
        async with open_stream(
            service.session, url, token, params=other, headers={"Last-Event-ID": cursor}
        ) as s:
            names = [e.name for e in s.events]
            assert names[0] == "reset", (other, names)
            got: dict[str, dict[str, Any]] = {}
            apply(got, s)
            want = await expected(owner_db, user, other)
            assert {k: _plain(v) for k, v in got.items()} == {k: _plain(v) for k, v in want.items()}


async def test_a_plain_cursor_resumed_with_a_filter_resets(
    service: Service, db: asyncpg.Connection, user: uuid.UUID
) -> None:
    await insert_file(db, user, "a.pdf")
    url, token = service.url(EVENTS), token_for(user)
    async with open_stream(service.session, url, token) as s:
        cursor = s.last_id
    assert cursor is not None and cursor.isdigit()
    async with open_stream(
        service.session, url, token, params=IN_PROGRESS, headers={"Last-Event-ID": cursor}
    ) as s:
        assert [e.name for e in s.events] == ["reset", "file-update", "synced"]


async def test_bad_filters_are_400_invalid_filter_naming_what_is_wrong(
    service: Service, user: uuid.UUID
) -> None:
    cases = {
        "colour=eq.red": "colour",
        "status=equals.ready": "equals",
        "progress=gte.lots": "lots",
        "progress=in.(1,two)": "two",
        "created_at=lt.yesterday": "yesterday",
        "select=id,colour": "colour",
        "error_message=is.maybe": "maybe",
    }
    headers = {"Authorization": f"Bearer {token_for(user)}"}
    for query, named in cases.items():
        async with service.session.get(
            service.url(EVENTS), headers=headers, params=parse_qsl(query)
        ) as answer:
            body = await answer.json()
            assert (answer.status, body["code"]) == (400, "INVALID_FILTER"), query
            assert named in body["error"], (query, body)
    assert service.app[keys.HUB].count == 0


async def test_a_recovery_after_the_change_connection_was_lost_honours_the_shape(
    service: Service, db: asyncpg.Connection, owner_db: asyncpg.Connection, user: uuid.UUID
) -> None:
    a = await insert_file(db, user, "a.pdf")
    b = await insert_file(db, user, "b.pdf", status="failed")
    url, token = service.url(EVENTS), token_for(user)
    params = {**IN_PROGRESS, "snapshot": "1"}
    async with open_stream(service.session, url, token, params=params) as s:
        dispatcher = service.app[keys.DISPATCHER]
        await kill_change_connection(service, owner_db)
        await db.execute("update files set status = 'ready' where id = $1", a)
        await db.execute("update files set status = 'processing' where id = $1", b)
        await insert_file(db, user, "c.pdf", status="failed")
        await wait_until(lambda: dispatcher.ready.is_set())
        await holds(s, await expected(owner_db, user, IN_PROGRESS))


async def test_random_filters_and_writes_every_stream_ends_as_select_where(
    service: Service,
    db: asyncpg.Connection,
    owner_db: asyncpg.Connection,
    user: uuid.UUID,
    other_user: uuid.UUID,
) -> None:
    """Random shapes (every operator, not., several ANDed) over random inserts, updates,
    changes of owner and deletes; half-way, each stream is resumed under its own shape or
    another. At the end each holds what `select ... where ...` gives."""
    rng = random.Random(20261203)
    statuses = ["pending", "processing", "ready", "failed"]

    def a_filter() -> tuple[str, str]:
        column = rng.choice(["status", "progress", "filename", "error_message", "file_type"])
        negate = rng.choice(["", "", "not."])
        if column == "status":
            op = rng.choice(["eq", "neq", "in", "lt", "gte"])
            value = (
                "(" + ",".join(rng.sample(statuses, 2)) + ")"
                if op == "in"
                else rng.choice(statuses)
            )
        elif column == "progress":
            op = rng.choice(["eq", "neq", "lt", "lte", "gt", "gte", "in"])
            value = (
                f"({rng.randint(0, 100)},{rng.randint(0, 100)})"
                if op == "in"
                else str(rng.randint(0, 100))
            )
        elif column == "filename":
            op = rng.choice(["like", "ilike", "eq"])
            value = rng.choice(["*.pdf", "A*", "*b*", "a.pdf"])
        elif column == "file_type":
            op, value = "is", rng.choice(["null", "null"])
        else:
            op, value = "is", "null"
        return column, f"{negate}{op}.{value}"

    shapes = []
    for _ in range(6):
        query: dict[str, str] = dict(a_filter() for _ in range(rng.randint(1, 3)))
        if rng.random() < 0.3:
            query["select"] = "status,progress"
        shapes.append(query)
    names = ["a.pdf", "A.txt", "b.pdf", "Ab.doc", "x"]
    ids: list[uuid.UUID] = []
    url, token = service.url(EVENTS), token_for(user)

    async def write(n: int) -> None:
        for _ in range(n):
            roll = rng.random()
            if roll < 0.3 or not ids:
                ids.append(
                    await insert_file(
                        db,
                        rng.choice([user, user, other_user]),
                        rng.choice(names),
                        status=rng.choice(statuses),
                        progress=rng.randint(0, 100),
                    )
                )
            elif roll < 0.8:
                await db.execute(
                    "update files set status = $2, progress = $3,"
                    " error_message = case when $4 then 'boom' end where id = $1",
                    rng.choice(ids),
                    rng.choice(statuses),
                    rng.randint(0, 100),
                    rng.random() < 0.3,
                )
            elif roll < 0.9:
                await db.execute(
                    "update files set user_id = $2 where id = $1",
                    rng.choice(ids),
                    rng.choice([user, other_user]),
                )
            else:
                await db.execute("delete from files where id = $1", rng.choice(ids))

    await write(20)
    held: list[tuple[dict[str, dict[str, Any]], str]] = []
    for query in shapes:
        async with open_stream(service.session, url, token, params={**query, "snapshot": "1"}) as s:
            await write(8)
            state = await holds(s, await expected(owner_db, user, query))
            assert s.last_id is not None
            held.append((state, s.last_id))
    await write(15)
    # Each client comes back with what it held and its cursor: under its own shape it is
    # caught up, under another it is reset; either way it ends as the query says.
    for n, (query, (state, cursor)) in enumerate(zip(shapes, held, strict=True)):
        under = query if n % 2 == 0 else shapes[(n + 1) % len(shapes)]
        async with open_stream(
            service.session, url, token, params=under, headers={"Last-Event-ID": cursor}
        ) as s:
            assert (s.events[0].name == "reset") == (under is not query or under == {}), n
            await write(6)
            await holds(s, await expected(owner_db, user, under), state)
