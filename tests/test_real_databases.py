"""A database set up the way teams run production: writers that are not the table's owner,
a table that evolves under a running service, bulk writes, TRUNCATE, and roles that can
only connect trying to make a user see something (by NOTIFY, or by a logical message in the
WAL, whichever the source under test reads): a forged payload neither leaks a row nor makes
cursors unusable."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from psycopg import sql

from streamer.changes import MAX_HORIZON, Change, signed_text
from streamer.sources.notify import LISTEN, PING
from tests.client import Stream, open_stream
from tests.conftest import (
    SOURCE,
    PostgresServer,
    Service,
    as_role,
    change_source,
    insert_file,
    send_raw,
    token_for,
    wait_until,
)
from tests.scrape import scrape

EVENTS = "/api/files/events"
NOBODY = "streamer_test_nobody"  # a role that may connect, and nothing else


def stream_of(service: Service, user: uuid.UUID, **params: str) -> Any:
    return open_stream(service.session, service.url(EVENTS), token_for(user), params=params)


async def next_file(stream: Stream, file_id: uuid.UUID) -> dict[str, Any]:
    """The next update of `file_id`, skipping others (a reconnect may repeat one)."""
    while True:
        event = await stream.next()
        if event.name == "file-update" and event.file["id"] == str(file_id):
            return event.file


# -- writers that are not the table's owner --------------------------------------------


async def test_a_writer_with_rights_on_files_only_makes_every_kind_of_change(
    service: Service, db: asyncpg.Connection, user: uuid.UUID, other_user: uuid.UUID
) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await db.fetchval("select count(*) from streamer.tombstones")
    assert not await db.fetchval("select rolsuper from pg_roles where rolname = current_user")
    async with stream_of(service, user) as mine, stream_of(service, other_user) as theirs:
        file_id = await insert_file(db, user, "scan.tiff")
        assert (await next_file(mine, file_id))["status"] == "pending"
        await db.execute("update files set error_message = $2 where id = $1", file_id, "x" * 2**20)
        assert len((await next_file(mine, file_id))["error_message"]) == 2**20
        await db.execute("update files set user_id = $2 where id = $1", file_id, other_user)
        gone = await mine.next()
        assert (gone.name, gone.file["id"]) == ("file-deleted", str(file_id))
        assert (await next_file(theirs, file_id))["filename"] == "scan.tiff"
        await db.execute("delete from files where id = $1", file_id)
        gone = await theirs.next()
        assert (gone.name, gone.file["id"]) == ("file-deleted", str(file_id))


async def test_a_bulk_transaction_of_a_writer_arrives_whole_and_in_order(
    service: Service, db: asyncpg.Connection, user: uuid.UUID
) -> None:
    async with stream_of(service, user) as stream:
        async with db.transaction():
            await db.execute(
                "insert into files (user_id, filename, progress)"
                " select $1, 'part-' || n, n % 101 from generate_series(1, 500) n",
                user,
            )
            await db.execute("update files set status = 'processing' where user_id = $1", user)
        events = [await stream.next() for _ in range(1000)]
    names = [e.file["filename"] for e in events]
    assert names[:500] == [f"part-{n}" for n in range(1, 501)]
    assert all(e.file["status"] == "processing" for e in events[500:])


# -- the table evolves under a running service -----------------------------------------


async def test_a_new_column_and_status_value_reach_open_and_new_streams(
    service: Service, db: asyncpg.Connection, owner_db: asyncpg.Connection, user: uuid.UUID
) -> None:
    file_id = await insert_file(db, user, "upload.zip")
    async with stream_of(service, user, snapshot="1") as stream:
        await owner_db.execute(
            """
            alter table files add column checksum text;
            alter table files drop constraint files_status_check;
            alter table files add constraint files_status_check
                check (status in ('pending', 'processing', 'ready', 'failed', 'cancelled'));
            alter table files alter column progress type bigint;
            """
        )
        await db.execute(
            "update files set status = 'cancelled', checksum = 'sha256:ab12' where id = $1",
            file_id,
        )
        row = await next_file(stream, file_id)
        assert (row["status"], row["checksum"]) == ("cancelled", "sha256:ab12")
        assert "user_id" not in row

    async with stream_of(service, user, snapshot="1") as fresh:
        (event,) = [e for e in fresh.events if e.name == "file-update"]
        assert (event.file["status"], event.file["checksum"]) == ("cancelled", "sha256:ab12")
    path = f"/api/files/{file_id}/events"
    async with open_stream(
        service.session, service.url(path), token_for(user), synced=False
    ) as one:
        assert (await one.next()).file["status"] == "cancelled"


# -- TRUNCATE --------------------------------------------------------------------------


async def test_truncate_tells_every_open_stream_reset_then_a_fresh_snapshot(
    service: Service, db: asyncpg.Connection, owner_db: asyncpg.Connection, user: uuid.UUID
) -> None:
    old = await insert_file(db, user, "old.pdf")
    async with (
        stream_of(service, user, snapshot="1") as stream,
        open_stream(
            service.session,
            service.url(f"/api/files/{old}/events"),
            token_for(user),
            synced=False,
        ) as one,
    ):
        assert (await one.next()).file["id"] == str(old)
        cursor = stream.last_id
        assert cursor is not None
        async with owner_db.transaction():
            await owner_db.execute("truncate files")
            await owner_db.execute(
                "insert into files (user_id, filename) values ($1, 'after.pdf')", user
            )
        events = await stream.until("synced")
        names = [e.name for e in events]
        assert names == ["reset", "file-update", "synced"]
        assert events[1].file["filename"] == "after.pdf"
        # The one-file stream ends: its file is gone.
        (gone,) = await one.end()
        assert (gone.name, gone.file["id"]) == ("file-deleted", str(old))
        # And the stream is live again.
        new = await insert_file(db, user, "later.pdf")
        assert (await next_file(stream, new))["filename"] == "later.pdf"

    # A client that was away during the TRUNCATE resumes into a reset, never a silent gap.
    async with open_stream(
        service.session, service.url(EVENTS), token_for(user), headers={"Last-Event-ID": cursor}
    ) as resumed:
        assert resumed.events[0].name == "reset"
        assert {e.file["filename"] for e in resumed.events if e.name == "file-update"} == {
            "after.pdf",
            "later.pdf",
        }


# -- forged notifications ----------------------------------------------------------------


@pytest.fixture
async def nobody(postgres: PostgresServer, database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A role that can connect to the database, and so NOTIFY or write a logical message to
    the WAL (pg_logical_emit_message is anyone's), but do nothing else."""
    with postgres.admin() as conn:
        if not conn.execute("select 1 from pg_roles where rolname = %s", (NOBODY,)).fetchone():
            conn.execute(
                sql.SQL("create role {} login password 'nobody'").format(sql.Identifier(NOBODY))
            )
    conn = await asyncpg.connect(as_role(database_url, NOBODY, "nobody"))
    yield conn
    await conn.close()


async def genuine_payload(
    service: Service, owner_db: asyncpg.Connection, file_id: uuid.UUID
) -> str:
    """A real payload of the change that made `file_id`, as a forger would write one (the
    trigger's format is public: function sources are readable by everyone). With notify it
    is read here on the feeds' channel, which only the owner can name; with wal no change
    travels in a message any more (the rows are decoded), so this is the one the fleet's
    reader would relay, signed with the real key: even that, put in the WAL as a message,
    shows nothing."""
    if SOURCE == "notify":
        seen: asyncio.Queue[str] = asyncio.Queue()
        channel = await owner_db.fetchval("select streamer.channel()")
        await owner_db.add_listener(channel, lambda *args: seen.put_nowait(args[-1]))
        await owner_db.execute("update files set progress = progress where id = $1", file_id)
        return await asyncio.wait_for(seen.get(), 10)
    key: bytes = await owner_db.fetchval("select key from streamer.signing_key")
    record = await owner_db.fetchrow(
        "select user_id::text as owner, streamer_version as version, streamer.files_row(f) as row,"
        " txid_current() as xid from files f where id = $1",
        file_id,
    )
    assert record is not None
    change = Change.model_validate(
        {"f": "files", "o": "u", "id": str(file_id), "u": record["owner"],
         "v": record["version"], "x": record["xid"], "m": record["xid"]}
    )  # fmt: skip
    change.row = record["row"]
    return signed_text(key, change)


async def test_a_role_that_can_only_connect_cannot_make_a_user_see_anything(
    service: Service,
    db: asyncpg.Connection,
    owner_db: asyncpg.Connection,
    nobody: asyncpg.Connection,
    user: uuid.UUID,
) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await nobody.fetchval("select count(*) from files")
    real = await insert_file(db, user, "real.pdf")
    genuine = await genuine_payload(service, owner_db, real)
    signature, body = ("", genuine) if SOURCE == "notify" else (genuine[:64], genuine[64:])
    envelope, _, row = body.partition("\n")
    fields = json.loads(envelope)
    newer = {**fields, "v": fields["v"] * 2, "x": fields["x"] + 10, "m": fields["m"] + 5}
    phishing = json.dumps({**json.loads(row), "filename": "PHISHING.pdf", "version": newer["v"]})
    forged_body = json.dumps(newer) + "\n" + phishing
    forgeries = [
        forged_body,  # unsigned, in the trigger's format
        hmac.new(b"guessed-key", forged_body.encode(), hashlib.sha256).hexdigest() + forged_body,
        "0" * 64 + forged_body,
    ]
    if signature:
        forgeries.append(signature + forged_body)  # a real signature on other content

    async def rejected() -> float:
        samples = await scrape(service.session, service.url("/metrics"))
        return samples["streamer_notifications_rejected_total"]

    before = await rejected()
    async with stream_of(service, user) as stream:
        if SOURCE == "wal":
            # Outside any transaction's order: not read at all, signed or not.
            await nobody.execute(
                "select pg_logical_emit_message(false, 'streamer', $1)", forgeries[0]
            )
            for payload in forgeries:
                await send_raw(nobody, payload)
            # Even signed with the real key: no message makes a row, only row changes do.
            key: bytes = await owner_db.fetchval("select key from streamer.signing_key")
            mac = hmac.new(key, forged_body.encode(), hashlib.sha256).hexdigest()
            await send_raw(nobody, mac + forged_body)

            async def all_rejected() -> bool:
                return await rejected() == before + len(forgeries)

            await wait_until(all_rejected)
        else:
            # The channel is the secret: the forger can neither name it nor call what does.
            for secret in ("select streamer.channel()", "select streamer.listen()",
                           "select key from streamer.signing_key"):  # fmt: skip
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await nobody.execute(secret)
            # Sent where earlier releases listened, and on a guess: nothing reaches the service.
            for channel in ("streamer", "streamer_" + "0" * 40, "streamer_files"):
                for payload in forgeries:
                    await nobody.execute("select pg_notify($1, $2)", channel, payload)
        await db.execute("update files set progress = 7 where id = $1", real)
        # (The insert itself may come first: it may still be on its way when the stream opens.)
        while (update := await stream.next()).file["progress"] != 7:
            assert update.file["filename"] == "real.pdf"
        assert update.file["filename"] == "real.pdf"
        assert all("PHISHING" not in e.data for e in stream.events)
    if SOURCE == "notify":
        assert await rejected() == before  # they never reached it


async def test_a_role_that_can_only_connect_cannot_listen_to_the_rows(
    service: Service,
    db: asyncpg.Connection,
    owner_db: asyncpg.Connection,
    nobody: asyncpg.Connection,
    user: uuid.UUID,
) -> None:
    """Under notify the triggers send on a channel named after the signing key, which the
    forger cannot read, and nowhere else; nor does the name show where a monitoring role
    (pg_read_all_stats) looks: the change connection's query text, or a function's source."""
    if SOURCE != "notify":
        pytest.skip("with wal, changes travel in the WAL, which only a replication role reads")
    heard: asyncio.Queue[str] = asyncio.Queue()
    for channel in ("streamer", "streamer_files", "files"):
        await nobody.add_listener(channel, lambda *args: heard.put_nowait(args[-1]))
    secret: str = await owner_db.fetchval("select streamer.channel()")
    file_id = await insert_file(db, user, "private.pdf")
    await db.execute("update files set progress = 50 where id = $1", file_id)
    # Notifications arrive in commit order: all the triggers sent came before this one.
    await owner_db.execute("select pg_notify('streamer', 'end of test')")
    while (payload := await asyncio.wait_for(heard.get(), 10)) != "end of test":
        assert str(file_id) not in payload and "private.pdf" not in payload

    await owner_db.execute("grant pg_read_all_stats to " + NOBODY)
    try:
        listener = change_source(service).pid
        query = await nobody.fetchval("select query from pg_stat_activity where pid = $1", listener)
        assert query in (LISTEN, PING)
        everywhere = await nobody.fetchval(
            "select string_agg(query, ' ') from pg_stat_activity where pid <> pg_backend_pid()"
        )
        assert secret not in everywhere
    finally:
        await owner_db.execute("revoke pg_read_all_stats from " + NOBODY)
    sources = await nobody.fetchval("select string_agg(prosrc, ' ') from pg_proc")
    assert "streamer.channel()" in sources and secret not in sources


@pytest.mark.usefixtures("nothing_logged_at_error")
async def test_forged_notifications_neither_leak_a_row_nor_make_cursors_unusable(
    service: Service,
    db: asyncpg.Connection,
    owner_db: asyncpg.Connection,
    user: uuid.UUID,
    other_user: uuid.UUID,
) -> None:
    # Under notify only the owner's rights reach the feeds' channel; under wal anyone's.
    sender = owner_db if SOURCE == "notify" else db
    theirs = await insert_file(db, other_user, "their-secret.pdf")

    def change(op: str, file_id: uuid.UUID, owner: uuid.UUID, v: int, x: int, m: int) -> str:
        return json.dumps(
            {"f": "files", "o": op, "id": str(file_id), "u": str(owner), "v": v, "x": x, "m": m}
        )

    stranger = uuid.uuid4()
    forged = [
        "not json",
        "[1, 2, 3]",
        change("x", theirs, user, 1, 1, 1),
        # A reference to someone else's row, addressed to this user: read back, not sent.
        change("u", theirs, user, 1, 1, 1),
        # Horizons no transaction has: cursors must stay ones this server accepts.
        change("d", uuid.uuid4(), stranger, 1, 1, 10**30),
        change("d", uuid.uuid4(), stranger, 1, 1, -5),
        change("d", uuid.uuid4(), stranger, 10**30, 10**30, 2**62),
        # The largest horizon a cursor can carry: resuming from it gets a reset, not a 400.
        change("d", uuid.uuid4(), stranger, 1, 1, MAX_HORIZON),
    ]
    url = service.url(EVENTS)
    async with open_stream(service.session, url, token_for(user)) as stream:
        for payload in forged:
            await send_raw(sender, payload)
        mine = await insert_file(db, user, "mine.pdf")
        event = await stream.next()
        assert event.file["id"] == str(mine)
        raw = "".join(e.data for e in stream.events)
        assert str(theirs) not in raw and "their-secret" not in raw
        cursor = event.id
    assert cursor is not None
    async with open_stream(
        service.session, url, token_for(user), headers={"Last-Event-ID": cursor}
    ) as resumed:
        assert resumed.events[-1].name == "synced"
