"""Settings, read once from the environment (and CLI flags) and validated at start-up."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# What a browser sends as Origin: scheme://host[:port], nothing after it.
_ORIGIN = re.compile(r"https?://[a-z0-9.\-]+(:[0-9]{1,5})?|https?://\[[0-9a-f:.]+\](:[0-9]{1,5})?")


class ConfigError(Exception):
    """A setting is invalid; the message is one line naming it."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STREAMER_", extra="ignore", frozen=True)

    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("DATABASE_URL", "database_url")
    )
    # For deployments whose pool goes through PgBouncer in transaction mode (no LISTEN there).
    listen_database_url: str | None = None
    # Where changes come from: NOTIFY, or logical messages read from the WAL (sources/).
    source: Literal["notify", "wal"] = "notify"
    # A fleet: every process sharing the database and this Redis (redis://host:port/N) reads
    # the database through one of them (streamer/fleet.py); unset, each reads it itself.
    broker_url: str | None = None
    # The built-in `files` table and its feed (sql/001_files.sql); off: `migrate` leaves it out.
    files_table: bool = True
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=8080, ge=0, le=65535)
    # Connections the kernel queues before the service accepts them (capped by
    # net.core.somaxconn): a crowd reconnecting at once must not be dropped at the door.
    listen_backlog: int = Field(default=4096, ge=1, le=65535)
    # Connections of a process being set up at once (a request read, a catch-up, until
    # live); the others wait unread, costing a socket each (streamer/gate.py).
    max_opening: int = Field(default=256, ge=1, le=100_000)
    jwt_secret: str | None = None
    jwks_url: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_cookie: str = Field(default="access_token", min_length=1)
    heartbeat_seconds: float = Field(default=30.0, gt=0, le=3600)
    retry_ms: int = Field(default=2000, ge=0, le=600_000)
    cors_origins: str = ""
    max_streams_per_user: int = Field(default=100, ge=1)
    max_streams: int = Field(default=20_000, ge=1)
    # Per stream: events held while it reads the database, and bytes its client has not
    # taken yet; past either, or with bytes unsent past the write timeout, it is cut.
    queue_limit: int = Field(default=1000, ge=1)
    buffer_limit_bytes: int = Field(default=4 * 1024 * 1024, ge=64 * 1024)
    write_timeout_seconds: float = Field(default=15.0, gt=0)
    tombstone_retention_hours: float = Field(default=168.0, gt=0)
    pool_size: int = Field(default=4, ge=1, le=100)
    data_dir: Path = Path(".streamer")
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    workers: int = Field(default=1, ge=1, le=64)

    @field_validator("database_url", "listen_database_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if not value:
            return None  # an empty variable is an unset one
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a URL: postgresql://user@host:5432/db")
        return value

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        if value.startswith("nats://"):
            raise ValueError("this release's fleet runs on Redis 7+, not NATS: redis://host:port/N")
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a Redis URL: redis://host:port/N (Redis 7+)")
        return value

    @field_validator("jwks_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("https://", "http://")):
            raise ValueError("must be an http(s):// URL")
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: str) -> str:
        if "*" in value:
            raise ValueError("a wildcard cannot be used with credentials; list the origins")
        # A trailing slash or capitals would never match a browser's Origin header.
        origins = [o.strip().lower().removesuffix("/") for o in value.split(",") if o.strip()]
        for origin in origins:
            if not _ORIGIN.fullmatch(origin):
                raise ValueError(f"{origin!r} is not an origin like https://app.example.com")
        return ",".join(origins)

    @model_validator(mode="after")
    def _one_port_for_all_workers(self) -> Settings:
        if self.workers > 1 and self.port == 0:
            raise ValueError("STREAMER_PORT must be a fixed port when STREAMER_WORKERS > 1")
        return self

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    @property
    def source_given(self) -> bool:
        """STREAMER_SOURCE was set: migrating then switches the database to it."""
        return "source" in self.model_fields_set

    @property
    def embedded(self) -> bool:
        return self.database_url is None


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with explicit (flag) values on top; one-line errors."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)  # type: ignore[arg-type]
    except ValidationError as exc:
        error = exc.errors()[0]
        message = error["msg"].removeprefix("Value error, ")
        if not error["loc"]:  # a check of several settings: the message names them
            raise ConfigError(f"invalid settings: {message}") from None
        name = str(error["loc"][0]).lower()
        env = "DATABASE_URL" if name == "database_url" else f"STREAMER_{name.upper()}"
        raise ConfigError(f"invalid setting {env}: {message}") from None
