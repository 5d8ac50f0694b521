"""sql/ applied by `streamer migrate` or by `psql -f` of each file in order gives the same
schema, and applying it again changes nothing."""

from __future__ import annotations

import subprocess

from streamer.db import migrate, migrations
from streamer.embedded import POSTGRES_BIN_PATH
from tests.conftest import fresh_database


def schema(url: str) -> str:
    """The schema as pg_dump prints it, without the runner's own bookkeeping table."""
    dump = subprocess.run(
        [
            str(POSTGRES_BIN_PATH / "pg_dump"), "--schema-only", "--no-owner",
            "--exclude-table=streamer.migrations", url,
        ],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return "\n".join(line for line in dump.stdout.splitlines() if not line.startswith("\\"))


def psql_files(url: str) -> None:
    files = [arg for path in migrations() for arg in ("-f", str(path))]
    subprocess.run(
        [str(POSTGRES_BIN_PATH / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", *files, url],
        check=True, capture_output=True, text=True,
    )  # fmt: skip


def test_migrate_applies_each_file_once_and_a_second_run_changes_nothing(postgres):
    with fresh_database(postgres, None) as url:
        assert migrate(url) == [path.name for path in migrations()]
        first = schema(url)
        assert "streamer_notify" in first and "files_touch_updated_at" in first
        assert migrate(url) == []
        assert schema(url) == first


def test_psql_f_of_each_file_in_order_gives_the_same_schema_as_migrate(postgres):
    with fresh_database(postgres, None) as by_runner, fresh_database(postgres, None) as by_psql:
        migrate(by_runner)
        psql_files(by_psql)
        assert schema(by_psql) == schema(by_runner)


def test_running_the_files_again_with_psql_changes_nothing(postgres):
    with fresh_database(postgres, None) as url:
        psql_files(url)
        first = schema(url)
        psql_files(url)
        migrate(url)  # the runner after psql: records the files, changes no schema
        assert schema(url) == first
