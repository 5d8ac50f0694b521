"""pgoutput's logical replication messages, protocol version 1, parsed from the bytes of
one XLogData payload (PostgreSQL's "Logical Replication Message Formats").

Pure: no connection, no I/O. `parse` turns a payload into one frozen dataclass, or raises
ValueError for a payload that is malformed or of a kind protocol 1 does not send. Values
of a row arrive as text (never binary: the `binary` option stays off): a column's value
is its type's output text, None for NULL, or UNCHANGED for a TOASTed value the row change
did not touch (not sent: read the row back for it). Text is decoded as UTF-8, so the
replication connection must use client_encoding UTF8. Times are float seconds since the
Unix epoch, as `time.time()` gives them (the protocol sends microseconds since
2000-01-01; a float keeps them to the microsecond).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

# Seconds from the Unix epoch to Postgres's, 2000-01-01 00:00:00 UTC.
POSTGRES_EPOCH: Final = 946_684_800
KEY_COLUMN: Final = 1  # a Relation column's flags: part of the replica identity
TRANSACTIONAL: Final = 1  # a LogicalMessage's flags
TRUNCATE_CASCADE: Final = 1  # a Truncate's options
TRUNCATE_RESTART_IDENTITY: Final = 2

_INT16 = struct.Struct("!h")
_INT32 = struct.Struct("!i")
_UINT32 = _OID = struct.Struct("!I")
_BEGIN = struct.Struct("!QqI")  # final LSN, commit time, xid
_COMMIT = struct.Struct("!BQQq")  # flags, commit LSN, end LSN, commit time
_LSN = struct.Struct("!Q")
_COLUMN = struct.Struct("!Ii")  # type oid, type modifier
_RELATION_END = struct.Struct("!Bh")  # replica identity, column count
_TRUNCATE = struct.Struct("!IB")  # relation count, options
_MESSAGE = struct.Struct("!BQ")  # flags, LSN
_TEXT, _NULL, _UNCHANGED_BYTE = ord("t"), ord("n"), ord("u")
_NEW, _KEY, _OLD = ord("N"), ord("K"), ord("O")


class Unchanged(enum.Enum):
    """The type of UNCHANGED: a TOASTed value the change left as it was, so not sent."""

    UNCHANGED = "u"


UNCHANGED: Final = Unchanged.UNCHANGED
Value = str | None | Unchanged
Values = tuple[Value, ...]  # one per column of the Relation, in its order


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int  # the LSN of the transaction's commit record
    commit_time: float
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    flags: int  # unused by Postgres so far
    commit_lsn: int
    end_lsn: int  # the end of the commit record: what to confirm as flushed
    commit_time: float


@dataclass(frozen=True, slots=True)
class Origin:
    commit_lsn: int  # the commit's LSN on the origin server
    name: str


@dataclass(frozen=True, slots=True)
class Column:
    key: bool  # part of the replica identity (the primary key, by default)
    name: str
    type_oid: int
    type_modifier: int  # atttypmod: -1, or varchar(n)'s n + 4, numeric's precision and scale


@dataclass(frozen=True, slots=True)
class Relation:
    """Sent before a table's first change in a session and again after it changed."""

    oid: int
    namespace: str  # "" for pg_catalog
    name: str
    replica_identity: str  # d(efault), n(othing), f(ull), i(ndex)
    columns: tuple[Column, ...]  # the published ones: never dropped nor generated columns


@dataclass(frozen=True, slots=True)
class Type:
    """Sent before a Relation that has a column of a non-built-in type."""

    oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    relation: int
    new: Values


@dataclass(frozen=True, slots=True)
class Update:
    """`key` is the old replica identity when it changed (other columns None); `old` the
    whole old row with replica identity full; both None otherwise."""

    relation: int
    new: Values
    key: Values | None = None
    old: Values | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    """One of `key` (the replica identity's columns, the others None) and `old` (the whole
    row, with replica identity full) is set."""

    relation: int
    key: Values | None
    old: Values | None


@dataclass(frozen=True, slots=True)
class Truncate:
    relations: tuple[int, ...]  # every table of the statement that is published
    cascade: bool
    restart_identity: bool


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    """pg_logical_emit_message's: transactional ones come between their Begin and Commit."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes


Message = (
    Begin | Commit | Origin | Relation | Type | Insert | Update | Delete | Truncate | LogicalMessage
)


def parse(payload: bytes) -> Message:
    """The message of one pgoutput payload; ValueError if it is malformed or unknown."""
    if not payload:
        raise ValueError("empty pgoutput message")
    parser = _PARSERS.get(payload[0])
    if parser is None:
        raise ValueError(f"unknown pgoutput message kind {payload[:1]!r}")
    try:
        message, end = parser(payload)
    except (struct.error, IndexError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"malformed pgoutput message {payload[:1]!r}: {exc}") from None
    if end != len(payload):
        raise ValueError(f"malformed pgoutput message {payload[:1]!r}: bytes past its end")
    return message


def _time(microseconds: int) -> float:
    return microseconds / 1_000_000 + POSTGRES_EPOCH


def _string(buf: bytes, pos: int) -> tuple[str, int]:
    """A zero-terminated string at `pos`, and the position after it."""
    end = buf.index(0, pos)
    return buf[pos:end].decode(), end + 1


def _values(buf: bytes, pos: int) -> tuple[Values, int]:
    """TupleData at `pos`: a column count, then per column n(ull), u(nchanged TOASTed
    value) or t(ext) with its length and bytes."""
    (count,) = _INT16.unpack_from(buf, pos)
    pos += 2
    values: list[Value] = []
    append = values.append
    unpack_length = _UINT32.unpack_from  # a garbage length is too long, never negative
    for _ in range(count):
        kind = buf[pos]
        if kind == _TEXT:
            start = pos + 5
            pos = start + unpack_length(buf, pos + 1)[0]
            append(buf[start:pos].decode())
        elif kind == _NULL:
            append(None)
            pos += 1
        elif kind == _UNCHANGED_BYTE:
            append(UNCHANGED)
            pos += 1
        else:  # b(inary), only with the `binary` option, or garbage
            raise ValueError(f"column of kind {bytes([kind])!r}")
    if pos > len(buf):
        raise ValueError("a value runs past the end")
    return tuple(values), pos


def _begin(buf: bytes) -> tuple[Begin, int]:
    final_lsn, commit_time, xid = _BEGIN.unpack_from(buf, 1)
    return Begin(final_lsn, _time(commit_time), xid), 1 + _BEGIN.size


def _commit(buf: bytes) -> tuple[Commit, int]:
    flags, commit_lsn, end_lsn, commit_time = _COMMIT.unpack_from(buf, 1)
    return Commit(flags, commit_lsn, end_lsn, _time(commit_time)), 1 + _COMMIT.size


def _origin(buf: bytes) -> tuple[Origin, int]:
    (lsn,) = _LSN.unpack_from(buf, 1)
    name, end = _string(buf, 1 + _LSN.size)
    return Origin(lsn, name), end


def _relation(buf: bytes) -> tuple[Relation, int]:
    (oid,) = _OID.unpack_from(buf, 1)
    namespace, pos = _string(buf, 5)
    name, pos = _string(buf, pos)
    identity, count = _RELATION_END.unpack_from(buf, pos)
    pos += _RELATION_END.size
    columns = []
    for _ in range(count):
        flags = buf[pos]
        column, pos = _string(buf, pos + 1)
        type_oid, modifier = _COLUMN.unpack_from(buf, pos)
        pos += _COLUMN.size
        columns.append(Column(bool(flags & KEY_COLUMN), column, type_oid, modifier))
    return Relation(oid, namespace, name, chr(identity), tuple(columns)), pos


def _type(buf: bytes) -> tuple[Type, int]:
    (oid,) = _OID.unpack_from(buf, 1)
    namespace, pos = _string(buf, 5)
    name, pos = _string(buf, pos)
    return Type(oid, namespace, name), pos


def _insert(buf: bytes) -> tuple[Insert, int]:
    (oid,) = _OID.unpack_from(buf, 1)
    if buf[5] != _NEW:
        raise ValueError("no new tuple")
    new, end = _values(buf, 6)
    return Insert(oid, new), end


def _update(buf: bytes) -> tuple[Update, int]:
    (oid,) = _OID.unpack_from(buf, 1)
    kind, key, old = buf[5], None, None
    if kind == _KEY:
        key, pos = _values(buf, 6)
    elif kind == _OLD:
        old, pos = _values(buf, 6)
    else:
        pos = 5
    if buf[pos] != _NEW:
        raise ValueError("no new tuple")
    new, end = _values(buf, pos + 1)
    return Update(oid, new, key, old), end


def _delete(buf: bytes) -> tuple[Delete, int]:
    (oid,) = _OID.unpack_from(buf, 1)
    kind = buf[5]
    if kind not in (_KEY, _OLD):
        raise ValueError("no key nor old tuple")
    values, end = _values(buf, 6)
    if kind == _KEY:
        return Delete(oid, values, None), end
    return Delete(oid, None, values), end


def _truncate(buf: bytes) -> tuple[Truncate, int]:
    count, options = _TRUNCATE.unpack_from(buf, 1)
    start = 1 + _TRUNCATE.size
    end = start + 4 * count
    if end > len(buf):
        raise ValueError("fewer relations than its count")
    relations = struct.unpack_from(f"!{count}I", buf, start)
    cascade = bool(options & TRUNCATE_CASCADE)
    return Truncate(relations, cascade, bool(options & TRUNCATE_RESTART_IDENTITY)), end


def _logical_message(buf: bytes) -> tuple[LogicalMessage, int]:
    flags, lsn = _MESSAGE.unpack_from(buf, 1)
    prefix, pos = _string(buf, 1 + _MESSAGE.size)
    (length,) = _INT32.unpack_from(buf, pos)
    start = pos + _INT32.size
    end = start + length
    if end > len(buf):
        raise ValueError("content runs past the end")
    return LogicalMessage(bool(flags & TRANSACTIONAL), lsn, prefix, buf[start:end]), end


_PARSERS: dict[int, Callable[[bytes], tuple[Message, int]]] = {
    ord("B"): _begin,
    ord("C"): _commit,
    ord("O"): _origin,
    ord("R"): _relation,
    ord("Y"): _type,
    ord("I"): _insert,
    ord("U"): _update,
    ord("D"): _delete,
    ord("T"): _truncate,
    ord("M"): _logical_message,
}
