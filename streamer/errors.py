"""Every error a client can cause, as a small named class with its HTTP status and code,
and what a connection out of reach looks like.

The one place client errors become responses is the error middleware in app.py.
"""

import asyncpg
import psycopg2

# A database or its change connection out of reach, whichever driver met it (psycopg2: the
# WAL's replication connection; a fleet's broker turns its errors into ConnectionError,
# streamer/sources/broker.py): retried, or answered 503, never a bug. asyncpg's
# InternalClientError is what its next query on a connection meets after Postgres ended the
# session unasked (idle_session_timeout: the fleet's election, on a loop held up past it):
# "cannot switch to state 12; another operation (2) is in progress".
CONNECTION_ERRORS = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    TimeoutError,
    psycopg2.Error,
)


class ApiError(Exception):
    status = 400
    code = "BAD_REQUEST"
    message = "The request is not valid."

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.message)
        self.message = message or self.message


class AuthError(ApiError):
    """Any 401: the response carries `WWW-Authenticate: Bearer`."""

    status = 401


class AuthRequired(AuthError):
    code = "AUTH_REQUIRED"
    message = "A bearer token is required: Authorization header, access_token parameter or cookie."


class TokenInvalid(AuthError):
    code = "TOKEN_INVALID"
    message = "The token is not valid."


class TokenExpired(AuthError):
    code = "TOKEN_EXPIRED"
    message = "The token has expired."


class InvalidCursor(ApiError):
    code = "INVALID_CURSOR"
    message = "Last-Event-ID is not a cursor this server issued."


class InvalidFilter(ApiError):
    """A shaped stream's filter or select that cannot be honoured (streamer/shapes.py)."""

    code = "INVALID_FILTER"
    message = "The filter is not valid."


class Forbidden(ApiError):
    """A valid token that may not use this feed: it lacks the feed's owner claim."""

    status = 403
    code = "FORBIDDEN"
    message = "The token may not use this feed."


class InvalidId(ApiError):
    code = "INVALID_ID"


class InvalidParameter(ApiError):
    code = "INVALID_PARAMETER"


class NotFound(ApiError):
    status = 404
    code = "NOT_FOUND"


class TooManyStreams(ApiError):
    status = 429
    code = "TOO_MANY_STREAMS"
    message = "Too many open streams for this user."


class Unavailable(ApiError):
    status = 503
    code = "UNAVAILABLE"
