"""The roles and grants docs/DATABASE.md tells a team to run work as printed, as the roles
they name."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from streamer.embedded import POSTGRES_BIN_PATH
from streamer.migrations import migrate
from tests.conftest import PostgresServer, as_role, with_database

ROOT = Path(__file__).parent.parent


def sql_blocks(page: Path) -> dict[str, list[str]]:
    """The page's ```sql blocks by the role their first line says they run as."""
    blocks: dict[str, list[str]] = {}
    for block in re.findall(r"```sql\n(.*?)```", page.read_text(), flags=re.DOTALL):
        first, _, rest = block.partition("\n")
        role = re.fullmatch(r"-- as (a superuser|\w+)(, in the database \w+)?", first.strip())
        assert role, f"{page.name}: a sql block that does not say who runs it: {first!r}"
        blocks.setdefault(role.group(1), []).append(rest)
    return blocks


def psql(url: str, text: str) -> None:
    done = subprocess.run(
        [str(POSTGRES_BIN_PATH / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", url],
        input=text, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "NOTICE" not in done.stderr, done.stderr


def test_the_role_and_grant_lines_of_the_docs_work_as_printed(postgres: PostgresServer) -> None:
    blocks = sql_blocks(ROOT / "docs" / "DATABASE.md")
    with postgres.admin() as conn:
        taken = conn.execute(
            "select 1 from pg_roles where rolname in ('streamer', 'worker', 'app_owner')"
            " union all select 1 from pg_database where datname = 'app'"
        ).fetchall()
        if taken:  # never someone else's: roles are the whole server's
            pytest.skip("this server has a database app or a role the docs create already")
        conn.execute("create database app")
        conn.execute("create role app_owner login password 'change-me'")
    admin = with_database(postgres.admin_url, "app")
    try:
        with psycopg.connect(admin, autocommit=True) as conn:  # the app's own migrations
            conn.execute("create table jobs (id bigint primary key, owner_id text, name text)")
            conn.execute("alter table jobs owner to app_owner")
        for text in blocks["a superuser"]:
            psql(admin, text)
        service = as_role(admin, "streamer", "change-me")
        migrate(service)
        order = [("streamer", 0), ("app_owner", 0), ("streamer", 1)]
        for role, index in order:
            psql(as_role(admin, role, "change-me"), blocks[role][index])
        worker = as_role(admin, "worker", "change-me")
        with psycopg.connect(worker, autocommit=True) as conn:
            conn.execute("insert into jobs (id, owner_id, name) values (1, 'alice', 'x')")
            conn.execute("insert into files (user_id, filename) values (gen_random_uuid(), 'a')")
        with psycopg.connect(service, autocommit=True) as conn:
            feeds = conn.execute("select name from streamer.feeds order by name").fetchall()
        assert feeds == [("files",), ("jobs",)]
    finally:
        with postgres.admin() as conn:
            conn.execute("drop database if exists app with (force)")
            for role in ("streamer", "worker", "app_owner"):
                conn.execute(sql.SQL("drop role if exists {}").format(sql.Identifier(role)))
