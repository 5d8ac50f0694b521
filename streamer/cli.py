"""streamer serve | migrate | token | demo"""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import psycopg

from streamer import __version__
from streamer.app import create_app
from streamer.auth import mint_token
from streamer.config import ConfigError, Settings, load_settings
from streamer.db import Database, fresh, migrate, source_problem
from streamer.demo import run_demo
from streamer.logs import setup_logging
from streamer.migrations import MigrationError
from streamer.runner import StartupError, Terminated, first_line, raise_on_sigterm, run_server
from streamer.supervisor import serve_workers

log = logging.getLogger("streamer")

DESCRIPTION = """\
Stream Postgres row changes to browsers as Server-Sent Events: the built-in `files` table,
and any table made a feed with `select streamer.enable_feed(...)` (docs/DATABASE.md).

  streamer serve      run the service (an embedded Postgres when DATABASE_URL is unset)
  streamer migrate    apply sql/ to DATABASE_URL (--source switches the change source)
  streamer token      mint a development HS256 token for an owner (any feed's owner type)
  streamer demo       embedded Postgres + simulated file processor + demo page

Configuration comes from the environment (DATABASE_URL, STREAMER_*); flags override it.
"""


def dev_secret(settings: Settings) -> str:
    """The dev-mode secret: generated once, kept in the data dir."""
    path = settings.data_dir / "jwt_secret"
    if not path.exists():
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return path.read_text().strip()


def resolve_secret(settings: Settings) -> Settings:
    """Outside dev mode some way to verify tokens is required; in dev mode one is made."""
    if settings.jwt_secret or settings.jwks_url:
        return settings
    if not settings.embedded:
        raise ConfigError(
            "invalid setting STREAMER_JWT_SECRET: set it (or STREAMER_JWKS_URL) "
            "when DATABASE_URL is set"
        )
    return settings.model_copy(update={"jwt_secret": dev_secret(settings)})


def _settings(args: argparse.Namespace) -> Settings:
    flags: dict[str, Any] = {
        name: getattr(args, name, None)
        for name in (
            "host",
            "port",
            "database_url",
            "data_dir",
            "workers",
            "heartbeat_seconds",
            "source",
            "files_table",
        )
    }
    return load_settings(**flags)


def _print_welcome(settings: Settings, dsn: str) -> None:
    user = uuid.uuid4()
    assert settings.jwt_secret is not None
    token = mint_token(settings.jwt_secret, user, 24 * 3600)
    base = f"http://{settings.host}:{settings.port}"
    # What README.md's lines use, pasted into another terminal (every value is shell-safe:
    # a URL without spaces, a UUID, a JWT). Not in this one: with DATABASE_URL set, a later
    # `streamer serve` here would take it for a database of its own.
    print(
        f"""
streamer is serving on {base} (embedded Postgres, data in {settings.data_dir}/)

In two other terminals, export a user, a token for it (valid 24 h) and the database:
  export BASE_URL={base} USER_ID={user} TOKEN={token} DATABASE_URL={dsn}
then watch the user's files in one, and make an event in the other (README.md):
  curl -N -H "Authorization: Bearer $TOKEN" "$BASE_URL/api/files/events"
  psql "$DATABASE_URL" -c "insert into files (user_id, filename) values ('$USER_ID', 'hello.pdf')"
""",
        flush=True,
    )


def _direct_url_name(settings: Settings) -> str:
    return "STREAMER_LISTEN_DATABASE_URL" if settings.listen_database_url else "DATABASE_URL"


def _migrate(settings: Settings, database: Database, *, switch: bool = True) -> list[str]:
    """Apply sql/. Like LISTEN, migrating needs a session of its own (it holds an advisory
    lock), so it goes to the direct connection when the pool goes through PgBouncer. With
    STREAMER_SOURCE set and `switch`, the feeds' triggers then send through that source."""
    source = settings.source if settings.source_given and switch else None
    try:
        return migrate(database.listen_dsn, source, files_table=settings.files_table)
    except psycopg.OperationalError as exc:
        raise StartupError(f"cannot use {_direct_url_name(settings)}: {first_line(exc)}") from None
    except MigrationError as exc:
        raise StartupError(str(exc)) from None


def _check_source(settings: Settings, database: Database, **when: bool) -> None:
    """The database's triggers send through this process's source, and the server lets it
    read them (for wal: wal_level, a role that may replicate): or one line saying why not."""
    try:
        problem = source_problem(database.listen_dsn, settings.source, **when)
    except psycopg.Error as exc:
        raise StartupError(f"cannot use {_direct_url_name(settings)}: {first_line(exc)}") from None
    if problem is not None:
        raise StartupError(problem)


def _check_broker(settings: Settings) -> None:
    """A fleet's broker that cannot be reached stops start-up, in one line."""
    if settings.broker_url is None:
        return
    from streamer.fleet import broker_problem  # the broker's client only for a fleet

    problem = broker_problem(settings.broker_url)
    if problem is not None:
        raise StartupError(f"cannot use STREAMER_BROKER_URL: {problem}")


def cmd_serve(args: argparse.Namespace) -> int:
    raise_on_sigterm()  # so that a SIGTERM during start-up unwinds `with Database`
    settings = resolve_secret(_settings(args))
    setup_logging(settings)
    with Database.from_settings(settings) as database:
        # Serving never switches a database others may be serving from: only the embedded
        # one, or one with no feeds yet. The switch is `streamer migrate`'s.
        switch = settings.source_given and not args.no_migrate
        switch = switch and (database.embedded is not None or fresh(database.listen_dsn))
        _check_source(settings, database, switching=switch, migrated=False)  # before writing
        if not args.no_migrate:
            _migrate(settings, database, switch=switch)
        _check_source(settings, database)
        _check_broker(settings)
        if database.embedded is not None:
            _print_welcome(settings, database.dsn)
        # A partial of a module-level function: it is pickled to every worker.
        make_app = partial(create_app, settings, database.dsn, database.listen_dsn)
        if settings.workers > 1:
            return serve_workers(settings, make_app)
        run_server(settings, make_app)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    raise_on_sigterm()
    settings = _settings(args)
    setup_logging(settings)
    with Database.from_settings(settings) as database:
        applied = _migrate(settings, database)
        print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none needed'}")
        if settings.source_given:
            print(f"the feeds send through {settings.source}")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    settings = resolve_secret(_settings(args))
    user = args.user.strip()
    if not user or len(user) > 1024 or "\x00" in user:
        raise ConfigError(f"--user must be an owner: a UUID or 1 to 1024 characters, not {user!r}")
    if args.ttl <= 0:
        raise ConfigError("--ttl must be a positive number of seconds")
    assert settings.jwt_secret is not None
    print(
        mint_token(
            settings.jwt_secret,
            user,
            args.ttl,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
        )
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    raise_on_sigterm()
    settings = resolve_secret(_settings(args))
    setup_logging(settings)
    return run_demo(settings)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="streamer", description=DESCRIPTION, formatter_class=argparse.RawTextHelpFormatter
    )
    top.add_argument("--version", action="version", version=f"streamer {__version__}")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--database-url", help="Postgres URL (DATABASE_URL); unset: embedded")
        p.add_argument("--data-dir", type=Path, help="embedded data (STREAMER_DATA_DIR)")

    serve = commands.add_parser("serve", help="run the service")
    common(serve)
    serve.add_argument("--host", help="address to bind (STREAMER_HOST, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (STREAMER_PORT, 8080)")
    serve.add_argument("--workers", type=int, help="processes sharing the port (SO_REUSEPORT)")
    serve.add_argument("--heartbeat-seconds", type=float, help="heartbeat interval (30)")
    serve.add_argument("--no-migrate", action="store_true", help="do not apply sql/ first")
    serve.add_argument("--source", help="where changes come from: notify or wal (STREAMER_SOURCE)")
    serve.set_defaults(run=cmd_serve)

    mig = commands.add_parser("migrate", help="apply sql/ migrations, each once")
    common(mig)
    mig.add_argument("--source", help="switch the feeds to notify or wal (STREAMER_SOURCE)")
    mig.add_argument(
        "--no-files-table",
        dest="files_table",
        action="store_false",
        default=None,
        help="leave the built-in files table and feed out (STREAMER_FILES_TABLE=false)",
    )
    mig.set_defaults(run=cmd_migrate)

    token = commands.add_parser("token", help="mint a development HS256 token")
    common(token)
    token.add_argument(
        "--user", required=True, help="the owner the token is for (uuid or text): its sub"
    )
    token.add_argument("--ttl", type=int, default=3600, help="seconds until it expires (3600)")
    token.set_defaults(run=cmd_token)

    demo = commands.add_parser("demo", help="embedded Postgres, a simulated writer, a page")
    common(demo)
    demo.add_argument("--host", help="address to bind (127.0.0.1)")
    demo.add_argument("--port", type=int, help="port (8080)")
    demo.set_defaults(run=cmd_demo)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except ConfigError as exc:
        print(f"streamer: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"streamer: {exc}", file=sys.stderr)
        return 1
    except Terminated:
        log.info("stopped on SIGTERM")
        return 0  # as asked, and what it had started is stopped: as when serving
    except KeyboardInterrupt:
        return 130
    return code
