"""Any table is a feed: one `streamer.enable_feed(...)` while the service runs gives a table
both routes with the files contract (issue 12), and `files` streams as before beside it.

The `jobs` table here is what teams start from: a bigint identity id, an owner column of
text holding a `sub` that is not a UUID, a jsonb column, and a column that is never sent.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest

from streamer import keys
from streamer.auth import mint_token
from streamer.feeds import Feed
from streamer.sources.notify import LISTEN, PING
from tests.client import Event, Stream, open_stream
from tests.conftest import (
    SECRET,
    SOURCE,
    WRITER,
    PostgresServer,
    Service,
    change_source,
    fresh_database,
    insert_file,
    token_for,
    wait_until,
)

ALICE, BOB = "auth0|alice", "github|4242"  # subs of an identity provider, not UUIDs
JOBS = """
    create table jobs (
        id       bigint generated always as identity primary key,
        owner_id text not null,
        name     text not null,
        status   text not null default 'queued',
        progress integer not null default 0,
        params   jsonb,
        api_key  text  -- the worker's credential: never sent
    );
    grant select, insert, update, delete on jobs to {writer};
"""
JOB_COLUMNS = ["id", "name", "status", "progress", "params"]
TERMINAL = "status in ('completed', 'failed')"
# Every key of a `file` as the files contract sends it.
FILE_KEYS = {
    "id",
    "filename",
    "file_type",
    "status",
    "progress",
    "processing_stage",
    "error_message",
    "created_at",
    "updated_at",
    "version",
}


def token(sub: str) -> str:
    return mint_token(SECRET, sub, 3600)


def bearer(sub: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(sub)}"}


async def enable_feed(
    owner_db: asyncpg.Connection,
    service: Service,
    table: str,
    owner_column: str,
    *,
    event: str | None = None,
    terminal: str | None = None,
    columns: list[str] | None = None,
    replace: bool = False,
) -> Feed:
    """Enable (or, with `replace`, reconfigure) a feed as a person at psql would, and wait
    until the running service serves it as `streamer.feeds` now says."""
    await owner_db.execute(
        "select streamer.enable_feed($1::text::regclass, owner_column => $2, event => $3,"
        " terminal => $4, columns => $5, replace => $6)",
        table,
        owner_column,
        event,
        terminal,
        columns,
        replace,
    )
    # What the service will find when it reads the feeds again (enable_feed's signal).
    feed: Feed = (await service.app[keys.DISPATCHER].reads.feeds())[table]
    feeds = service.app[keys.FEEDS]
    await wait_until(lambda: feeds.get(feed.name) == feed)
    return feed


async def create_jobs(owner_db: asyncpg.Connection) -> None:
    await owner_db.execute(JOBS.format(writer=WRITER))


async def enable_jobs(owner_db: asyncpg.Connection, service: Service) -> Feed:
    return await enable_feed(
        owner_db,
        service,
        "jobs",
        "owner_id",
        event="job",
        terminal=TERMINAL,
        columns=JOB_COLUMNS,
    )


@pytest.fixture
async def jobs(service: Service, owner_db: asyncpg.Connection) -> Feed:
    """`jobs`, created and enabled while the service runs."""
    await create_jobs(owner_db)
    return await enable_jobs(owner_db, service)


async def insert_job(
    db: asyncpg.Connection, owner: str, name: str = "resize", **columns: Any
) -> int:
    names = ["owner_id", "name", *columns]
    values = [owner, name, *columns.values()]
    placeholders = ", ".join(f"${i}" for i in range(1, len(values) + 1))
    job_id: int = await db.fetchval(
        f"insert into jobs ({', '.join(names)}) values ({placeholders}) returning id", *values
    )
    return job_id


def all_jobs(service: Service, sub: str, **params: str) -> Any:
    return open_stream(service.session, service.url("/api/jobs/events"), token(sub), params=params)


def one_job(service: Service, job_id: int | str, sub: str) -> Any:
    """One job's stream; its first event is the job's state (there is no `synced`)."""
    url = service.url(f"/api/jobs/{job_id}/events")
    return open_stream(service.session, url, token(sub), synced=False)


def job(event: Event) -> dict[str, Any]:
    row: dict[str, Any] = event.json["job"]
    return row


async def next_job(stream: Stream, job_id: int) -> Event:
    """The next event about `job_id`, skipping others."""
    while True:
        event = await stream.next()
        if event.name.startswith("job-") and job(event)["id"] == job_id:
            return event


def before_synced(stream: Stream) -> list[Event]:
    names = [e.name for e in stream.events]
    return stream.events[: names.index("synced")]


async def answer(service: Service, path: str, sub: str) -> tuple[int, dict[str, Any]]:
    async with service.session.get(service.url(path), headers=bearer(sub)) as response:
        return response.status, await response.json()


# -- picked up while the service runs ---------------------------------------------------


async def test_a_table_enabled_while_the_service_runs_gets_both_routes_without_a_restart(
    service: Service, owner_db: asyncpg.Connection, db: asyncpg.Connection
) -> None:
    await create_jobs(owner_db)
    job_id = await insert_job(db, ALICE, "before")
    assert await answer(service, "/api/jobs/events", ALICE) == (
        404,
        {"error": "No such feed.", "code": "NOT_FOUND"},
    )
    assert (await answer(service, f"/api/jobs/{job_id}/events", ALICE))[0] == 404

    await enable_jobs(owner_db, service)
    async with all_jobs(service, ALICE, snapshot="1") as stream:
        assert [(e.name, job(e)["name"]) for e in before_synced(stream)] == [
            ("job-update", "before")
        ]
        new = await insert_job(db, ALICE, "after")
        event = await stream.next()
        assert (event.name, job(event)["id"], job(event)["name"]) == ("job-update", new, "after")
    async with one_job(service, job_id, ALICE) as one:
        assert job(await one.next())["name"] == "before"


async def test_a_new_feed_shares_the_one_change_connection_of_the_process(
    service: Service, owner_db: asyncpg.Connection, db: asyncpg.Connection
) -> None:
    source, dispatcher = change_source(service), service.app[keys.DISPATCHER]
    listener, sessions = source.pid, dispatcher.sessions
    assert listener is not None

    await create_jobs(owner_db)
    await enable_jobs(owner_db, service)
    async with all_jobs(service, ALICE) as stream:
        job_id = await insert_job(db, ALICE)
        assert job(await stream.next())["id"] == job_id

        assert (source.pid, dispatcher.sessions) == (listener, sessions)
        listens = await owner_db.fetch(  # LISTENing backends, or walsenders (WAL source)
            "select pid from pg_stat_activity where datname = current_database()"
            " and (query = any($1::text[]) or backend_type = 'walsender')",
            [LISTEN, PING],
        )
        assert [r["pid"] for r in listens] == [listener]
        ours = {db.get_server_pid(), owner_db.get_server_pid()}
        theirs = await owner_db.fetchval(
            "select count(*) from pg_stat_activity where datname = current_database()"
            " and pid <> all($1::int[])",
            list(ours),
        )
        assert theirs <= 1 + service.settings.pool_size


# -- the jobs feed: the files contract with `job` ---------------------------------------


async def test_a_job_is_sent_with_its_listed_columns_only(
    service: Service, jobs: Feed, db: asyncpg.Connection
) -> None:
    first = await insert_job(db, ALICE, "thumbnails", api_key="sk-live-do-not-send")
    async with all_jobs(service, ALICE, snapshot="1") as stream:
        await db.execute("update jobs set status = 'running' where id = $1", first)
        events = [stream.events[0], await stream.next()]
    for event in events:
        assert event.name == "job-update"
        assert set(event.json) == {"eventType", "timestamp", "job"}
        assert set(job(event)) == {*JOB_COLUMNS, "version"}
        assert "sk-live-do-not-send" not in event.data and ALICE not in event.data
    assert [job(e)["status"] for e in events] == ["queued", "running"]
    assert job(events[0])["id"] == first  # a bigint id is a JSON number


async def test_a_jsonb_value_arrives_as_json_not_as_a_string(
    service: Service, jobs: Feed, db: asyncpg.Connection
) -> None:
    params = {"width": 640, "formats": ["webp", "avif"], "crop": None, "note": 'say "hi"'}
    async with all_jobs(service, ALICE) as stream:
        await insert_job(db, ALICE, params=json.dumps(params))
        assert job(await stream.next())["params"] == params


async def test_each_user_receives_only_their_own_jobs(
    service: Service, jobs: Feed, db: asyncpg.Connection
) -> None:
    async with all_jobs(service, ALICE) as alices, all_jobs(service, BOB) as bobs:
        hers = await insert_job(db, ALICE, "her-secret-project")
        await db.execute("update jobs set progress = 50 where id = $1", hers)
        await db.execute("delete from jobs where id = $1", hers)
        his = await insert_job(db, BOB, "his")
        # Changes go out in commit order: anything of hers would have come first.
        event = await bobs.next()
        assert (event.name, job(event)["id"]) == ("job-update", his)
        assert [e.name for e in await alices.until("job-deleted")] == [
            "job-update",
            "job-update",
            "job-deleted",
        ]
    assert all("her-secret-project" not in e.data for e in bobs.events)


async def test_one_jobs_stream_follows_it_to_its_terminal_state_and_ends(
    service: Service, jobs: Feed, db: asyncpg.Connection
) -> None:
    job_id = await insert_job(db, ALICE, "transcode")
    async with one_job(service, job_id, ALICE) as stream:
        first = await stream.next()
        assert (first.name, job(first)["status"]) == ("job-update", "queued")
        for progress in (30, 60):
            await db.execute(
                "update jobs set status = 'running', progress = $2 where id = $1",
                job_id,
                progress,
            )
        await db.execute(
            "update jobs set status = 'completed', progress = 100 where id = $1", job_id
        )
        rest = await stream.end()
    assert [(job(e)["status"], job(e)["progress"]) for e in rest] == [
        ("running", 30),
        ("running", 60),
        ("completed", 100),
    ]
    assert stream.ended


async def test_a_job_id_that_is_not_an_integer_is_400_invalid_id(
    service: Service, jobs: Feed
) -> None:
    for bad in ("abc", "1.5", "1e3", "--5", "9" * 20, str(uuid.uuid4()), "%C2%B2"):
        status, body = await answer(service, f"/api/jobs/{bad}/events", ALICE)
        assert (status, body["code"]) == (400, "INVALID_ID"), bad


async def test_someone_elses_job_is_404_exactly_like_a_job_that_does_not_exist(
    service: Service, jobs: Feed, db: asyncpg.Connection
) -> None:
    bobs = await insert_job(db, BOB, "his")
    theirs = await answer(service, f"/api/jobs/{bobs}/events", ALICE)
    missing = await answer(service, f"/api/jobs/{bobs + 1000}/events", ALICE)
    assert theirs == missing
    assert theirs[0] == 404 and theirs[1]["code"] == "NOT_FOUND"
    assert "file" not in theirs[1]["error"]


async def gone_with_a_cursor(service: Service, db: asyncpg.Connection) -> tuple[int, int, int, str]:
    """Alice has two jobs (one to keep, one to delete) and a third she saw arrive live, and
    leaves with the cursor of that event."""
    kept = await insert_job(db, ALICE, "kept")
    doomed = await insert_job(db, ALICE, "doomed")
    async with all_jobs(service, ALICE) as stream:
        marker = await insert_job(db, ALICE, "marker")
        cursor = (await next_job(stream, marker)).id
    assert cursor is not None
    return kept, doomed, marker, cursor


async def test_a_resumed_jobs_stream_gets_job_deleted_for_a_job_deleted_while_away(
    service: Service, jobs: Feed, db: asyncpg.Connection
) -> None:
    kept, doomed, marker, cursor = await gone_with_a_cursor(service, db)
    await db.execute("delete from jobs where id = $1", doomed)
    await db.execute("update jobs set status = 'running' where id = $1", kept)

    async with open_stream(
        service.session,
        service.url("/api/jobs/events"),
        token(ALICE),
        headers={"Last-Event-ID": cursor},
    ) as resumed:
        # A repeat of the marker is allowed: the client has that version.
        caught_up = [e for e in before_synced(resumed) if job(e)["id"] != marker]
    assert [(e.name, job(e)) for e in caught_up[:1]] == [("job-deleted", {"id": doomed})]
    assert [(e.name, job(e)["id"], job(e)["status"]) for e in caught_up[1:]] == [
        ("job-update", kept, "running")
    ]


async def test_disable_feed_ends_open_job_streams_and_its_routes_404(
    service: Service, jobs: Feed, owner_db: asyncpg.Connection, db: asyncpg.Connection
) -> None:
    job_id = await insert_job(db, ALICE)
    async with all_jobs(service, ALICE) as stream, one_job(service, job_id, ALICE) as one:
        await one.next()
        await owner_db.execute("select streamer.disable_feed('jobs')")
        await stream.end()
        await one.end()
    assert (await answer(service, "/api/jobs/events", ALICE))[0] == 404
    assert (await answer(service, f"/api/jobs/{job_id}/events", ALICE))[0] == 404
    # The table is the team's again: its writers go on, with nothing of the feed left.
    await db.execute("update jobs set progress = 1 where id = $1", job_id)
    assert not await owner_db.fetchval(
        "select count(*) from pg_trigger where tgrelid = 'jobs'::regclass and not tgisinternal"
    )


async def test_a_cursor_from_before_disable_feed_gets_a_reset_when_the_feed_comes_back(
    service: Service, jobs: Feed, owner_db: asyncpg.Connection, db: asyncpg.Connection
) -> None:
    kept, doomed, marker, cursor = await gone_with_a_cursor(service, db)
    await owner_db.execute("select streamer.disable_feed('jobs')")
    # Changes while the feed is off leave no trace: no version, no tombstone.
    await db.execute("update jobs set status = 'running' where id = $1", kept)
    await db.execute("delete from jobs where id = $1", doomed)
    await enable_jobs(owner_db, service)

    async with open_stream(
        service.session,
        service.url("/api/jobs/events"),
        token(ALICE),
        headers={"Last-Event-ID": cursor},
    ) as resumed:
        events = before_synced(resumed)
    assert events[0].name == "reset"
    assert {(job(e)["id"], job(e)["status"]) for e in events[1:]} == {
        (kept, "running"),
        (marker, "queued"),
    }


async def test_files_stream_as_before_beside_a_jobs_feed_and_after_it_is_disabled(
    service: Service, jobs: Feed, owner_db: asyncpg.Connection, db: asyncpg.Connection
) -> None:
    user = uuid.uuid4()
    async with (
        open_stream(service.session, service.url("/api/files/events"), token_for(user)) as files,
        all_jobs(service, ALICE) as alices,
    ):
        await insert_job(db, ALICE)
        file_id = await insert_file(db, user, "beside.pdf")
        event = await files.next()
        assert (event.name, set(event.file), event.file["id"]) == (
            "file-update",
            FILE_KEYS,
            str(file_id),
        )
        assert (await alices.next()).name == "job-update"

        await owner_db.execute("select streamer.disable_feed('jobs')")
        await alices.end()
        after = await insert_file(db, user, "after.pdf")
        assert (await files.next()).file["id"] == str(after)


# -- other kinds of tables ----------------------------------------------------------------


@pytest.fixture
async def tickets(service: Service, owner_db: asyncpg.Connection) -> Feed:
    """A feed with text ids and a uuid owner column."""
    await owner_db.execute(
        f"""
        create table tickets (
            id       text primary key,
            owner_id uuid not null,
            title    text not null,
            state    text not null default 'open'
        );
        grant select, insert, update, delete on tickets to {WRITER};
        """
    )
    return await enable_feed(owner_db, service, "tickets", "owner_id", terminal="state = 'closed'")


async def test_a_feed_with_a_uuid_owner_refuses_a_sub_that_is_not_a_uuid(
    service: Service, tickets: Feed
) -> None:
    for path in ("/api/tickets/events", "/api/tickets/TCK-1/events"):
        async with service.session.get(service.url(path), headers=bearer(ALICE)) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert (await response.json())["code"] == "TOKEN_INVALID"


async def test_a_feed_with_text_ids_streams_one_row_to_its_delete(
    service: Service, tickets: Feed, db: asyncpg.Connection
) -> None:
    user = uuid.uuid4()
    ticket = "TCK-0042 ünïcode"
    await db.execute(
        "insert into tickets (id, owner_id, title) values ($1, $2, 'printer on fire')",
        ticket,
        user,
    )
    url = service.url("/api/tickets/TCK-0042%20%C3%BCn%C3%AFcode/events")
    async with open_stream(service.session, url, token_for(user), synced=False) as stream:
        first = await stream.next()
        assert (first.name, first.json["tickets"]["id"]) == ("tickets-update", ticket)
        assert "owner_id" not in first.json["tickets"]
        await db.execute("update tickets set state = 'triaged' where id = $1", ticket)
        await db.execute("delete from tickets where id = $1", ticket)
        rest = await stream.end()
    assert [(e.name, e.json["tickets"].get("state")) for e in rest] == [
        ("tickets-update", "triaged"),
        ("tickets-deleted", None),
    ]
    assert rest[1].json["tickets"] == {"id": ticket}


# -- enable_feed: configuration ----------------------------------------------------------


# case: (the table, its name for enable_feed, the arguments, what the error says)
BAD_INPUT: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "no primary key id": (
        "create table bad (job_id bigint primary key, owner_id text)",
        "bad",
        {},
        'bad needs a primary key column "id"',
    ),
    "an id that is not a primary key": (
        "create table bad (id bigint, owner_id text)",
        "bad",
        {},
        'bad needs a primary key column "id"',
    ),
    "an id of another type": (
        "create table bad (id numeric primary key, owner_id text)",
        "bad",
        {},
        "the id of bad must be uuid, an integer (bigint, integer, smallint) or text",
    ),
    "a missing owner column": (
        "create table bad (id bigint primary key, user_id text)",
        "bad",
        {},
        'bad needs an owner column "owner_id" of type uuid or text',
    ),
    "an owner column of another type": (
        "create table bad (id bigint primary key, owner_id integer)",
        "bad",
        {},
        'bad needs an owner column "owner_id" of type uuid or text',
    ),
    "a listed column that does not exist": (
        "create table bad (id bigint primary key, owner_id text, status text)",
        "bad",
        {"columns": ["id", "status", "colour"]},
        "bad has no column 'colour'",
    ),
    "a terminal that does not compile": (
        "create table bad (id bigint primary key, owner_id text, status text)",
        "bad",
        {"terminal": "state = 'done'"},
        "terminal (state = 'done') must be a condition over the columns of bad: column \"state\"",
    ),
    "a terminal that is not a condition": (
        "create table bad (id bigint primary key, owner_id text, status text)",
        "bad",
        {"terminal": "status"},
        "terminal (status) must be a condition over the columns of bad: it is of type text",
    ),
    "a terminal naming the table": (
        "create table bad (id bigint primary key, owner_id text, status text)",
        "bad",
        {"terminal": "bad.status = 'done'"},
        "terminal (bad.status = 'done') must be a condition over the columns of bad",
    ),
    "an event name with capitals and a space": (
        "create table bad (id bigint primary key, owner_id text)",
        "bad",
        {"event": "Job Done"},
        "event must be lower-case letters, digits and _, not Job Done",
    ),
    "a table name that cannot be a route": (
        'create table "Bad" (id bigint primary key, owner_id text)',
        '"Bad"',
        {},
        "a feed's table name must be lower-case letters, digits and _",
    ),
}


@pytest.fixture(scope="module")
def scratch_url(postgres: PostgresServer, template: str) -> Iterator[str]:
    """One database for every bad-input case; each works in a transaction it rolls back."""
    with fresh_database(postgres, template) as url:
        yield url


@pytest.fixture
async def scratch(scratch_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(scratch_url)
    work = conn.transaction()
    await work.start()
    try:
        yield conn
    finally:
        await work.rollback()
        await conn.close()


@pytest.mark.parametrize("case", BAD_INPUT, ids=list(BAD_INPUT))
async def test_enable_feed_refuses_bad_input_with_a_clear_error_and_creates_nothing(
    scratch: asyncpg.Connection, case: str
) -> None:
    create, table, arguments, message = BAD_INPUT[case]
    await scratch.execute(create)
    with pytest.raises(asyncpg.PostgresError) as raised:
        async with scratch.transaction():  # a savepoint, so that the checks below can run
            await scratch.execute(
                "select streamer.enable_feed($1::text::regclass, owner_column => 'owner_id',"
                " event => $2, terminal => $3, columns => $4)",
                table,
                arguments.get("event"),
                arguments.get("terminal"),
                arguments.get("columns"),
            )
    assert message in str(raised.value)
    assert str(raised.value).startswith("streamer: ")
    left = await scratch.fetchrow(
        """
        select (select count(*) from streamer.feeds where tbl = $1::text::regclass) as feeds,
               (select count(*) from streamer.horizon where feed = 'bad') as horizons,
               (select count(*) from pg_trigger where tgrelid = $1::text::regclass
                  and not tgisinternal) as triggers,
               (select count(*) from pg_proc where pronamespace = 'streamer'::regnamespace
                  and proname ilike 'bad%') as functions,
               (select count(*) from pg_attribute where attrelid = $1::text::regclass
                  and attname = 'streamer_version') as version_columns
        """,
        table,
    )
    assert dict(left) == dict.fromkeys(left.keys(), 0)


async def test_enable_feed_again_with_other_arguments_reconfigures_the_feed(
    service: Service, jobs: Feed, owner_db: asyncpg.Connection, db: asyncpg.Connection
) -> None:
    async with all_jobs(service, ALICE) as before:
        await enable_feed(
            owner_db,
            service,
            "jobs",
            "owner_id",
            event="task",
            terminal="status = 'cancelled'",
            columns=["status"],
            replace=True,
        )
        await before.end()  # its events are named otherwise now: the client reconnects

    job_id = await insert_job(db, ALICE)
    async with one_job(service, job_id, ALICE) as stream:
        first = await stream.next()
        assert (first.name, first.json["task"]) == (
            "task-update",
            {"id": job_id, "status": "queued", "version": first.json["task"]["version"]},
        )
        await db.execute("update jobs set status = 'completed' where id = $1", job_id)
        await db.execute("update jobs set status = 'cancelled' where id = $1", job_id)
        rest = await stream.end()
    assert [e.json["task"]["status"] for e in rest] == ["completed", "cancelled"]
    triggers = await owner_db.fetch(
        "select tgname from pg_trigger where tgrelid = 'jobs'::regclass and not tgisinternal"
    )
    # The version's stamp and TRUNCATE's; then the notification of every change (notify),
    # or the tombstones of deletes and of changes of owner (wal: rows are decoded).
    per_source = (
        ["streamer_notify"] if SOURCE == "notify" else ["streamer_deleted", "streamer_moved"]
    )
    expected = ["streamer_stamp", "streamer_truncate", *per_source]
    assert sorted(t["tgname"] for t in triggers) == sorted(expected)


async def test_a_writer_without_rights_on_schema_streamer_makes_every_kind_of_change(
    service: Service, jobs: Feed, db: asyncpg.Connection
) -> None:
    for forbidden in (
        "select count(*) from streamer.feeds",
        "select streamer.enable_feed('jobs', 'owner_id')",
        "select streamer.disable_feed('jobs')",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await db.execute(forbidden)
    async with all_jobs(service, ALICE) as stream:
        job_id = await insert_job(db, ALICE, "x" * 10_000)  # too big for NOTIFY: read back
        inserted = await stream.next()
        await db.execute("update jobs set status = 'running' where id = $1", job_id)
        updated = await stream.next()
        await db.execute("delete from jobs where id = $1", job_id)
        deleted = await stream.next()
    assert (inserted.name, job(inserted)["name"]) == ("job-update", "x" * 10_000)
    assert (updated.name, job(updated)["status"]) == ("job-update", "running")
    assert (deleted.name, job(deleted)) == ("job-deleted", {"id": job_id})


async def test_a_job_given_to_another_owner_is_job_deleted_for_the_old_and_job_update_for_the_new(
    service: Service, jobs: Feed, db: asyncpg.Connection
) -> None:
    job_id = await insert_job(db, ALICE, "handover")
    async with all_jobs(service, ALICE, snapshot="1") as alices, all_jobs(service, BOB) as bobs:
        await db.execute("update jobs set owner_id = $2 where id = $1", job_id, BOB)
        gone, got = await alices.next(), await bobs.next()
    assert (gone.name, job(gone)) == ("job-deleted", {"id": job_id})
    assert (got.name, job(got)["id"], job(got)["name"]) == ("job-update", job_id, "handover")


async def test_a_job_left_without_an_owner_is_job_deleted_for_its_owner_and_writers_go_on(
    service: Service, jobs: Feed, owner_db: asyncpg.Connection, db: asyncpg.Connection
) -> None:
    await owner_db.execute("alter table jobs alter column owner_id drop not null")
    job_id = await insert_job(db, ALICE, "orphaned")
    async with all_jobs(service, ALICE, snapshot="1") as stream:
        await db.execute("update jobs set owner_id = null where id = $1", job_id)
        gone = await stream.next()
        assert (gone.name, job(gone)) == ("job-deleted", {"id": job_id})
        # Nobody's jobs go to nobody, and no writer's statement fails for them.
        nightly: int = await db.fetchval("insert into jobs (name) values ('nightly') returning id")
        await db.execute("update jobs set progress = 5 where owner_id is null")
        await db.execute("delete from jobs where id = $1", job_id)
        await db.execute("update jobs set owner_id = $2 where id = $1", nightly, ALICE)
        adopted = await stream.next()
        assert (adopted.name, job(adopted)["id"], job(adopted)["progress"]) == (
            "job-update",
            nightly,
            5,
        )


async def test_truncating_jobs_resets_only_the_jobs_streams(
    service: Service, jobs: Feed, owner_db: asyncpg.Connection, db: asyncpg.Connection
) -> None:
    user = uuid.uuid4()
    await insert_job(db, ALICE, "old")
    async with (
        all_jobs(service, ALICE, snapshot="1") as alices,
        open_stream(service.session, service.url("/api/files/events"), token_for(user)) as files,
    ):
        async with owner_db.transaction():
            await owner_db.execute("truncate jobs")
            await insert_job(owner_db, ALICE, "new")
        events = await alices.until("synced")
        assert [(e.name, e.data and e.json.get("job", {}).get("name")) for e in events] == [
            ("reset", None),
            ("job-update", "new"),
            ("synced", None),
        ]
        file_id = await insert_file(db, user)
        event = await files.next()
        assert (event.name, event.file["id"]) == ("file-update", str(file_id))
