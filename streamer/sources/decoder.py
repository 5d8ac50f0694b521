"""The feed tables' own row changes, decoded from the WAL (pgoutput), turned into the
changes streams are made of (streamer/changes.py).

What a writer's trigger used to put in each change is found here instead:
- the row: the new tuple of an INSERT or UPDATE, rendered as Postgres renders it in JSON
  (streamer/rowjson.py); a type not rendered natively, or a TOASTed value the UPDATE left
  unchanged (not in the WAL), leaves the row to be read back from the table;
- the old owner's delete: the tombstone the feed's AFTER DELETE / change-of-owner trigger
  writes is published too, so it arrives in the same transaction, with the owner and the
  version it was deleted at; a DELETE's own message (only the key) is not needed;
- the transaction's id: pgoutput's BEGIN names it (32 bits, widened here);
- the horizon, the oldest transaction that may still commit after this one: taken from a
  sample of the server, `txid_snapshot_xmin(...)` with the WAL's insert position, made
  before this transaction's commit record (`Horizons`). A transaction committing after it
  was not committed when that sample's snapshot was taken, so its id is at least that
  xmin: a cursor at that horizon misses nothing;
- whether the row is terminal (the feed's SQL expression): the BEFORE stamp evaluates it
  and keeps it in the version's lowest bit, which costs the writer one expression and
  travels with the row.

Only a row change can be in the WAL this way, so none can be forged; the logical messages
still read are the service's own recovery markers and the feeds-changed hint.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from streamer import pgoutput, pgtypes, rowjson
from streamer.changes import Change, Payload, Signed
from streamer.feeds import Feed, Feeds

log = logging.getLogger(__name__)

PREFIX = "streamer"  # of the logical messages: markers and hints
TOMBSTONES = ("streamer", "tombstones")
# A sample of the server: its oldest running transaction, and how far the WAL was written.
SAMPLE = (
    "select txid_snapshot_xmin(txid_current_snapshot()),"
    " (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint"
)
KEEP_SAMPLES = 64
Types = Mapping[int, pgtypes.TypeInfo]  # a relation's columns' types, by oid


class Horizons:
    """Samples (WAL position, xmin), oldest first; the horizon of a transaction is the xmin
    of the latest sample taken before its commit record was written."""

    def __init__(self) -> None:
        self._lsns: list[int] = []
        self._xmins: list[int] = []

    def add(self, lsn: int, xmin: int) -> None:
        if self._lsns and lsn < self._lsns[-1]:
            return  # a sample that overtook a later one: the later one is better
        self._lsns.append(lsn)
        self._xmins.append(xmin)
        if len(self._lsns) > KEEP_SAMPLES:
            del self._lsns[: len(self._lsns) - KEEP_SAMPLES]
            del self._xmins[: len(self._xmins) - KEEP_SAMPLES]

    def at(self, commit_lsn: int) -> int | None:
        """The horizon of a transaction whose commit record is at `commit_lsn` (None: no
        sample is older: cannot happen once the first was taken before reading began)."""
        index = bisect.bisect_right(self._lsns, commit_lsn) - 1
        if index < 0:
            return None
        # Samples older than the one used are of no more use: commits only move on.
        if index > 0:
            del self._lsns[:index]
            del self._xmins[:index]
        return self._xmins[0]


def widen(xid: int, floor: int) -> int:
    """A 32-bit transaction id as the 64-bit one txid_current() gives: the least one at or
    above `floor` (a horizon, which no transaction still to commit is below)."""
    full = (floor & ~0xFFFFFFFF) | xid
    return full if full >= floor else full + (1 << 32)


@dataclass(frozen=True, slots=True)
class Plan:
    """How one feed's rows are read from its table's tuples (made at each new layout)."""

    feed: Feed
    owner: int  # index of the owner column in the tuple
    id: int
    version: int
    row: rowjson.Shape  # the columns its events carry, and "version"


def plan(feed: Feed, relation: pgoutput.Relation, types: Types) -> Plan | None:
    """None when the table no longer has what the feed needs (its schema changed past it:
    the next RELATION message and the feeds read again tell)."""
    renderer = rowjson.RowRenderer(((c.name, c.type_oid) for c in relation.columns), types)
    names = renderer.names
    if any(name not in names for name in (feed.owner_column, "id", "streamer_version")):
        return None
    if feed.columns is not None:
        listed = list(feed.columns)  # one no longer there: every row is read back
    else:
        skip = {feed.owner_column, "version", "streamer_version"}
        listed = [name for name in names if name not in skip]
    return Plan(
        feed=feed,
        owner=renderer.index(feed.owner_column),
        id=renderer.index("id"),
        version=renderer.index("streamer_version"),
        row=renderer.shape(listed, ["version"]),
    )


class Decoder:
    """pgoutput's messages in, payloads out (`receive`), in commit order."""

    def __init__(
        self,
        feeds: Feeds,
        horizons: Horizons,
        signed: Signed,
        receive: Callable[[Payload], None],
    ) -> None:
        self.feeds = feeds
        self.signed = signed
        self.horizons = horizons
        self.receive = receive
        self._relations: dict[int, tuple[pgoutput.Relation, Types]] = {}
        self._plans: dict[int, Plan | None] = {}
        self._tombstones: int | None = None  # the oid of streamer.tombstones
        self._tombstone_columns: tuple[int, int, int, int] = (0, 1, 2, 3)
        self._xid = 0
        self._horizon = 0
        self._at = 0.0

    def learn(self, relation: pgoutput.Relation, types: Types) -> None:
        """A table's layout (a RELATION message: before its first change of a session, and
        again after its schema changed) with its columns' types, which the source reads
        from the catalog, and the feeds read again (a feed enabled a moment ago), first."""
        self._relations[relation.oid] = (relation, types)
        self._plans.pop(relation.oid, None)
        if (relation.namespace, relation.name) == TOMBSTONES:
            names = [column.name for column in relation.columns]
            self._tombstones = relation.oid
            self._tombstone_columns = (
                names.index("feed"),
                names.index("owner_id"),
                names.index("row_id"),
                names.index("version"),
            )

    def handle(self, message: pgoutput.Message) -> None:
        if isinstance(message, pgoutput.Begin):
            self._begin(message)
        elif isinstance(message, pgoutput.Insert | pgoutput.Update):
            self._changed(message.relation, message.new)
        elif isinstance(message, pgoutput.Truncate):
            for oid in message.relations:
                feed = self._feed(oid)
                if feed is not None:
                    self.receive(self._change(feed, op="t"))
        elif isinstance(message, pgoutput.LogicalMessage):
            self._message(message)
        # RELATION: `learn`. A DELETE's own message is the tombstone's to tell; COMMIT,
        # TYPE, ORIGIN: nothing.

    def _begin(self, begin: pgoutput.Begin) -> None:
        horizon = self.horizons.at(begin.final_lsn)
        if horizon is None:
            raise RuntimeError("a transaction decoded before the first horizon sample")
        self._xid = widen(begin.xid, horizon)
        self._horizon = min(horizon, self._xid)
        self._at = begin.commit_time

    def _feed(self, oid: int) -> Feed | None:
        for feed in self.feeds.by_name.values():
            if feed.oid == oid:
                return feed
        return None

    def _plan(self, oid: int) -> Plan | None:
        known = self._plans.get(oid)
        feed = self._feed(oid)
        if known is not None and known.feed is feed:
            return known
        layout = self._relations.get(oid)
        built = None if feed is None or layout is None else plan(feed, *layout)
        self._plans[oid] = built
        return built

    def _changed(self, oid: int, new: pgoutput.Values) -> None:
        if oid == self._tombstones:
            self._gone(new)
            return
        how = self._plan(oid)
        if how is None:
            return  # not a feed (any more)
        owner = new[how.owner]
        if not isinstance(owner, str):
            return  # no owner: the row is nobody's (its old owner's tombstone says it went)
        row_id, version = new[how.id], new[how.version]
        assert isinstance(row_id, str) and isinstance(version, str)
        feed = how.feed
        self.receive(
            self._change(
                feed,
                op="u",
                id=row_id,
                owner=owner,
                version=int(version),
                # The stamp's lowest bit (sql/006_decoded_rows.sql).
                terminal=bool(feed.terminal) and int(version) & 1 == 1,
                row=how.row.render(new, [version]),
            )
        )

    def _gone(self, tombstone: pgoutput.Values) -> None:
        """A tombstone written (a row deleted or moved away from its owner): the delete."""
        feed_name, owner, row_id, version = (tombstone[i] for i in self._tombstone_columns)
        if not (
            isinstance(feed_name, str)
            and isinstance(owner, str)
            and isinstance(row_id, str)
            and isinstance(version, str)
        ):
            return
        feed = self.feeds.get(feed_name)
        if feed is not None:
            self.receive(self._change(feed, op="d", id=row_id, owner=owner, version=int(version)))

    def _change(self, feed: Feed, **fields: Any) -> Change:
        # Built as read: every field is the database's own.
        return Change.model_construct(
            feed=feed.name, xid=self._xid, horizon=self._horizon, at=self._at, **fields
        )

    def _message(self, message: pgoutput.LogicalMessage) -> None:
        if message.prefix != PREFIX or not message.transactional:
            return  # another tool's, or outside any transaction (not in commit order)
        payload = self.signed.read(message.content.decode(errors="replace"))
        if isinstance(payload, Change):
            # Rows come from the WAL's row changes only. A signed change in a message is
            # an earlier design's, or tells such a process that it cannot read on.
            return
        self.receive(payload)  # a marker, the hint, a later release's change, a forgery
