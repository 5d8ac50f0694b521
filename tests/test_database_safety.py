"""A team's real database is never harmed: a refused command changes nothing, the app's
columns stay the app's, an existing `files` table or a role named `streamer` break nothing,
who may change a feed is checked first, and a process whose database was switched to the
other source under it says so instead of going deaf.

Through the roles a team really has: an owner of the app's tables, the service role (the
owner of schema streamer) and a writer."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import sql

from streamer import keys
from streamer.db import source_problem
from streamer.migrations import MigrationError, migrate, migrations
from tests.client import open_stream
from tests.conftest import (
    SOURCE,
    PostgresServer,
    Service,
    as_role,
    fresh_database,
    insert_file,
    system_postgres15,
    token_for,
    wait_until,
)

OTHER = "wal" if SOURCE == "notify" else "notify"
APP_OWNER = "streamer_test_app_owner"  # owns the app's tables, as a team's migrations do
SERVICE = "streamer_test_service"  # runs `streamer migrate` and `serve`
PASSWORD = "safety-password"


def streamer(*args: str) -> tuple[int, str]:
    """Run the command line as an operator does: (exit code, what it printed on stderr)."""
    env = {**os.environ, "STREAMER_JWT_SECRET": "x" * 32}
    env.pop("DATABASE_URL", None)
    env.pop("STREAMER_SOURCE", None)
    done = subprocess.run(
        [sys.executable, "-m", "streamer", *args], env=env, capture_output=True, text=True,
        stdin=subprocess.DEVNULL, timeout=60,
    )  # fmt: skip
    return done.returncode, done.stderr.strip()


def recorded_state(url: str) -> dict[str, Any]:
    """What a refused command must leave as it was."""
    with psycopg.connect(url, autocommit=True) as conn:
        schema = conn.execute("select to_regnamespace('streamer') is not null").fetchone()
        state: dict[str, Any] = {"schema": bool(schema and schema[0])}
        if state["schema"]:
            state["source"] = conn.execute("select source from streamer.config").fetchone()
            state["migrations"] = conn.execute(
                "select name, checksum from streamer.migrations order by name"
            ).fetchall()
        return state


def ensure_role(conn: psycopg.Connection[Any], name: str, *options: str) -> None:
    if not conn.execute("select 1 from pg_roles where rolname = %s", (name,)).fetchone():
        conn.execute(
            sql.SQL("create role {} login password {} " + " ".join(options)).format(
                sql.Identifier(name), sql.Literal(PASSWORD)
            )
        )


@pytest.fixture
def team(postgres: PostgresServer) -> Iterator[tuple[str, str]]:
    """An empty database owned by nobody of ours, with an app owner and a service role
    (neither superuser): (the app owner's URL, the service's URL)."""
    with postgres.admin() as conn:
        ensure_role(conn, APP_OWNER)
        ensure_role(conn, SERVICE, "replication")
    with fresh_database(postgres, None) as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"grant create on database {url.rsplit('/', 1)[1]} to {SERVICE}")
            conn.execute(f"grant create on schema public to {APP_OWNER}, {SERVICE}")
        yield as_role(url, APP_OWNER, PASSWORD), as_role(url, SERVICE, PASSWORD)


# -- a refusal changes nothing --------------------------------------------------------


def test_migrate_to_wal_on_a_server_without_logical_wal_changes_nothing() -> None:
    with system_postgres15("-c", "wal_level=replica") as (url, _socket):
        # A database with no feeds yet, which `serve` would migrate and may switch.
        code, error = streamer("serve", "--database-url", url, "--source", "wal")
        assert (code, error) == (
            1,
            "streamer: STREAMER_SOURCE=wal needs wal_level = logical (the server has"
            " replica): set it and restart Postgres",
        )
        assert recorded_state(url) == {"schema": False}
        migrate(url)
        before = recorded_state(url)
        code, error = streamer("migrate", "--database-url", url, "--source", "wal")
        assert (code, error.count("\n")) == (1, 0), error
        assert "needs wal_level = logical (the server has replica)" in error
        assert recorded_state(url) == before


def test_migrate_to_wal_as_a_role_that_may_not_replicate_changes_nothing(
    team: tuple[str, str],
) -> None:
    owner_url, _service_url = team
    code, error = streamer("migrate", "--database-url", owner_url, "--source", "wal")
    assert code == 1, error
    assert f"needs a role that may replicate: `alter role {APP_OWNER} replication`" in error
    assert recorded_state(owner_url) == {"schema": False}


def test_serve_never_switches_a_database_that_has_feeds(database_url: str) -> None:
    before = recorded_state(database_url)
    code, error = streamer("serve", "--database-url", database_url, "--source", OTHER)
    assert code == 1, error
    assert f"switch them with `STREAMER_SOURCE={OTHER} streamer migrate`" in error
    assert recorded_state(database_url) == before


async def test_a_process_whose_database_is_switched_under_it_ends_its_streams_and_is_unready(
    service: Service, database_url: str, db: asyncpg.Connection
) -> None:
    ready = service.url("/readyz")
    user = uuid.uuid4()
    async with open_stream(
        service.session, service.url("/api/files/events"), token_for(user)
    ) as stream:
        migrate(database_url, OTHER)  # `STREAMER_SOURCE=<other> streamer migrate`
        await stream.end()  # at once: the switch itself tells every process
    async with service.session.get(ready) as response:
        assert response.status == 503
        assert f"send through {OTHER}" in (await response.json())["error"]
    async with service.session.get(
        service.url("/api/files/events"), headers={"Authorization": f"Bearer {token_for(user)}"}
    ) as refused:
        assert (refused.status, (await refused.json())["code"]) == (503, "UNAVAILABLE")

    migrate(database_url, SOURCE)  # switched back: this process serves again
    dispatcher = service.app[keys.DISPATCHER]
    await wait_until(lambda: dispatcher.deaf is None and dispatcher.ready.is_set(), 20)
    async with open_stream(
        service.session, service.url("/api/files/events"), token_for(user)
    ) as stream:
        file_id = await insert_file(db, user)
        assert (await stream.next()).file["id"] == str(file_id)


# -- the app's columns are the app's -------------------------------------------------


APP_TABLE = """
create table jobs (
    id bigint generated always as identity primary key,
    owner_id text not null,
    status text not null default 'queued',
    version {version_type} not null default {version_default}
);
"""


@pytest.mark.parametrize(("version_type", "default"), [("integer", "1"), ("text", "'v1'")])
async def test_an_apps_own_version_column_is_never_written_and_the_feed_keeps_its_own(
    owner_db: asyncpg.Connection, version_type: str, default: str
) -> None:
    await owner_db.execute(APP_TABLE.format(version_type=version_type, version_default=default))
    await owner_db.execute("select streamer.enable_feed('jobs', owner_column => 'owner_id')")
    job_id = await owner_db.fetchval("insert into jobs (owner_id) values ('alice') returning id")
    for status in ("running", "done"):
        await owner_db.execute("update jobs set status = $2 where id = $1", job_id, status)
    row = await owner_db.fetchrow(
        "select version::text as app, streamer_version, streamer.jobs_row(j) as sent"
        " from jobs j where id = $1",
        job_id,
    )
    sent = json.loads(row["sent"])
    assert row["app"] == default.strip("'")
    kind = await owner_db.fetchval(
        "select format_type(atttypid, null) from pg_attribute"
        " where attrelid = 'jobs'::regclass and attname = 'streamer_version'"
    )
    assert kind == "bigint"  # a transaction id x 1024 never overflows it
    assert sent["version"] == row["streamer_version"]
    assert set(sent) == {"id", "status", "version"}

    with pytest.raises(asyncpg.PostgresError, match="columns cannot list version of jobs"):
        await owner_db.execute(
            "select streamer.enable_feed('jobs', 'owner_id', columns => array['version'],"
            " replace => true)"
        )
    await owner_db.execute("select streamer.disable_feed('jobs')")
    columns = await owner_db.fetchval(
        "select array_agg(attname::text order by attnum) from pg_attribute"
        " where attrelid = 'jobs'::regclass and attnum > 0 and not attisdropped"
    )
    assert columns == ["id", "owner_id", "status", "version"]


async def test_a_column_named_streamer_version_that_is_not_the_feeds_is_never_taken(
    owner_db: asyncpg.Connection,
) -> None:
    await owner_db.execute(
        "create table jobs (id bigint primary key, owner_id text, streamer_version integer)"
    )
    with pytest.raises(asyncpg.PostgresError) as refused:
        await owner_db.execute("select streamer.enable_feed('jobs', 'owner_id')")
    assert str(refused.value) == (
        "streamer: jobs already has a column streamer_version that is not the feed's:"
        " rename it first"
    )
    assert not await owner_db.fetchval("select count(*) from streamer.feeds where name = 'jobs'")


# -- enable_feed: who, and what twice means --------------------------------------------


async def test_enable_feed_checks_the_callers_rights_first_and_says_what_to_grant(
    postgres: PostgresServer, team: tuple[str, str]
) -> None:
    owner_url, service_url = team
    migrate(service_url)
    app = await asyncpg.connect(owner_url)
    service = await asyncpg.connect(service_url)
    try:
        await app.execute("create table jobs (id uuid primary key, owner_id uuid)")
        with pytest.raises(asyncpg.InsufficientPrivilegeError) as refused:
            await service.execute("select streamer.enable_feed('jobs', 'owner_id')")
        assert str(refused.value) == (
            f"streamer: enable_feed(jobs) needs the rights of its owner {APP_OWNER}:"
            f" `grant {APP_OWNER} to {SERVICE}` (as a superuser, or a role with admin option"
            f" on {APP_OWNER})"
        )
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="schema streamer"):
            await app.execute("select streamer.enable_feed('jobs', 'owner_id')")

        with postgres.admin() as conn:
            conn.execute(f"grant {APP_OWNER} to {SERVICE}")
        notices: list[Any] = []
        service.add_log_listener(lambda _conn, message: notices.append(message))
        await service.execute("select streamer.enable_feed('jobs', 'owner_id')")
        await service.execute("select streamer.enable_feed('jobs', 'owner_id')")  # the same
        with pytest.raises(asyncpg.PostgresError, match="replace => true"):
            await service.execute("select streamer.enable_feed('jobs', 'owner_id', event => 'x')")
        await service.execute(
            "select streamer.enable_feed('jobs', 'owner_id', event => 'x', replace => true)"
        )
        assert await service.fetchval("select event from streamer.feeds where name = 'jobs'") == "x"
        await service.execute("select streamer.disable_feed('jobs')")
        assert notices == []
    finally:
        await app.close()
        await service.close()


# -- an existing `files`, a role named `streamer` -------------------------------------


def test_an_existing_files_table_that_is_not_ours_is_one_line_and_nothing_made(
    team: tuple[str, str],
) -> None:
    _owner_url, service_url = team
    with psycopg.connect(service_url, autocommit=True) as conn:
        conn.execute("create table files (id serial primary key, path text not null)")
        conn.execute("insert into files (path) values ('/etc/motd')")
    with pytest.raises(MigrationError) as refused:
        migrate(service_url)
    assert str(refused.value) == (
        "a table public.files exists and is not streamer's built-in one (it has no column"
        " user_id): leave the built-in files feed out with STREAMER_FILES_TABLE=false"
        " (`streamer migrate --no-files-table`)"
    )
    assert recorded_state(service_url) == {"schema": False}

    assert migrate(service_url, files_table=False) == [path.name for path in migrations()]
    with psycopg.connect(service_url, autocommit=True) as conn:
        assert conn.execute("select path from files").fetchall() == [("/etc/motd",)]
        assert conn.execute("select count(*) from streamer.feeds").fetchone() == (0,)
        triggers = conn.execute(
            "select count(*) from pg_trigger where tgrelid = 'files'::regclass and not tgisinternal"
        ).fetchone()
        assert triggers == (0,)
        left = conn.execute("select to_regnamespace('streamer_files_left_out')").fetchone()
        assert left == (None,)
    assert migrate(service_url, files_table=False) == []


def test_a_half_failed_migration_leaves_nothing_behind(team: tuple[str, str]) -> None:
    _owner_url, service_url = team
    with psycopg.connect(service_url, autocommit=True) as conn:
        conn.execute("create table files (id uuid, user_id uuid, status text,"
                     " updated_at timestamptz)")  # fmt: skip
    # 001 and 002 apply; 003 cannot make it a feed (no primary key): the whole run goes.
    with pytest.raises(MigrationError) as refused:
        migrate(service_url)
    assert str(refused.value) == (
        '003_feeds.sql failed, nothing was changed: streamer: files needs a primary key column "id"'
    )
    assert recorded_state(service_url) == {"schema": False}


def test_a_service_role_named_streamer_puts_files_in_public_whatever_its_search_path(
    postgres: PostgresServer,
) -> None:
    with postgres.admin() as conn:
        ensure_role(conn, "streamer")
        ensure_role(conn, "worker")
    with fresh_database(postgres, None) as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"grant create on database {url.rsplit('/', 1)[1]} to streamer")
            conn.execute("grant create on schema public to streamer")
            conn.execute("create schema if not exists streamer authorization streamer")
        service_url = as_role(url, "streamer", PASSWORD)
        migrate(service_url)
        with psycopg.connect(service_url, autocommit=True) as conn:
            assert conn.execute("show search_path").fetchone() == ('"$user", public',)
            conn.execute("grant select, insert, update, delete on files to worker")
            where = conn.execute("select 'files'::regclass::text").fetchone()
        assert where == ("files",)  # public.files, found through the default search path
    with postgres.admin() as conn:  # its database is gone: nothing of theirs is left
        conn.execute("drop role streamer, worker")


# -- released migrations are frozen ----------------------------------------------------

# Each released file's sha256: a change here is a change of a released file. Add a new file.
RELEASED = {
    "001_files.sql": "efe217642999f9a0694d3624c4dc87d8538d6d6a64124ea073f31aab894b5397",
    "002_feed.sql": "0090a6766e90be38904bdc1a66dfa27a500fe521318d310457aac9836f38d871",
    "003_feeds.sql": "17f2904563bb369387801ccc298a8bff03ddc67a8e717a2d665d15350b23e129",
    "004_sources.sql": "fe8f58760c89077c7b56060cf92a319ad204467a5116cb8599d1d79538e219fe",
}


def test_every_released_migration_file_is_shipped_as_released() -> None:
    from streamer.migrations import checksum

    shipped = {path.name: checksum(path.read_text()) for path in migrations()}
    assert {name: shipped.get(name) for name in RELEASED} == RELEASED


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            "update streamer.migrations set checksum = repeat('0', 64)"
            " where name = '003_feeds.sql'",
            "migration 003_feeds.sql as applied to this database differs from the shipped one",
        ),
        (
            "insert into streamer.migrations (name, checksum) values ('999_later.sql', 'x')",
            "the database was migrated by a later release (999_later.sql is not shipped",
        ),
    ],
    ids=["edited", "from a later release"],
)
def test_a_database_whose_migrations_are_not_the_shipped_ones_stops_migrate_and_serve(
    database_url: str, edit: str, message: str
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(edit)
    before = recorded_state(database_url)
    with pytest.raises(MigrationError, match=re.escape(message)):
        migrate(database_url)
    problem = source_problem(database_url, SOURCE)
    assert problem is not None and message in problem and "\n" not in problem
    assert recorded_state(database_url) == before
