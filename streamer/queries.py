"""The SQL the service reads a feed with, built from the feed's configuration (its names
were validated by enable_feed, and are quoted here)."""

from __future__ import annotations

from streamer.feeds import Feed

FEEDS = (
    "select name, owner_column, event, terminal, id_type, owner_type,"
    " tbl::text as relation, exists (select from pg_index i join pg_attribute a"
    " on a.attrelid = i.indrelid and a.attnum = i.indkey[0] where i.indrelid = f.tbl"
    " and a.attname = f.owner_column and i.indisvalid and i.indpred is null)"
    " as owner_indexed, f.columns, f.tbl::oid as oid, f.owner_claim,"
    # The types of the columns its events carry, for shaped streams' filters.
    " (select json_object_agg(a.attname, format_type(a.atttypid, null))::text"
    " from pg_attribute a where a.attrelid = f.tbl and a.attnum > 0 and not a.attisdropped"
    " and a.attname not in (f.owner_column, 'streamer_version')"
    " and (a.attname = any(f.columns) or f.columns is null and a.attname <> 'version'))"
    " as column_types from streamer.feeds f"
)
VISIBLE = "select pg_visible_in_snapshot($1::text::xid8, pg_current_snapshot())"


def terminal(feed: Feed) -> str:
    return f"coalesce(({feed.terminal})::boolean, false)" if feed.terminal else "false"


def owner_in(feed: Feed, param: str) -> str:
    """The owner column among `param` (a text[]), compared in the column's own type so
    that an index on it is used."""
    return f'r."{feed.owner_column}" = any({param}::text[]::{feed.owner_type}[])'


def rows(feed: Feed, where: str, matches: str = "true") -> str:
    """Rows as streams send them, with what the service routes on; a row for which
    `matches` does not hold comes as no row (a delete, for a shaped stream)."""
    row = f'streamer."{feed.name}_row"(r)'
    if matches != "true":
        row = f"case when {matches} then {row} end"
    return (
        f'select {row} as row, r."{feed.owner_column}"::text as owner,'
        f" r.id::text as id, r.streamer_version as version, {terminal(feed)} as terminal"
        f" from {feed.relation} r where {where}"
    )


def one(feed: Feed) -> str:
    """The row $1 (an id as text), if its owner is among $2."""
    return rows(feed, f"r.id = $1::text::{feed.id_type} and {owner_in(feed, '$2')}")


def by_id(feed: Feed) -> str:
    return rows(feed, f"r.id = $1::text::{feed.id_type}")


def since(feed: Feed, tombstones: bool, where: str = "true") -> str:
    """Rows of owners $1 at versions >= $2 in version order and, with `tombstones`, the
    deletes among them, except of a row that is back (then its row says it all). `where`
    is a shaped stream's: a snapshot holds only the rows it takes, and a catch-up sends
    those it no longer takes as deletes."""
    versions = f"{owner_in(feed, '$1')} and r.streamer_version >= $2"
    if not tombstones:
        return rows(feed, f"{versions} and {where}") + " order by version"
    changed = rows(feed, versions, matches=where)
    gone = (
        "select null, t.owner_id, t.row_id, t.version, false from streamer.tombstones t"
        " where t.feed = $3 and t.owner_id = any($1::text[]) and t.version >= $2"
        # Compared in the columns' own types, so that an index finds the row: compared
        # as text, a resume with any tombstone scans the whole table.
        f" and not exists (select from {feed.relation} back"
        f" where back.id = t.row_id::{feed.id_type}"
        f' and back."{feed.owner_column}" = t.owner_id::{feed.owner_type})'
    )
    return f"{changed} union all {gone} order by version"


def counts(feed: Feed, cap: int, tombstones: bool = True) -> str:
    """How many rows and, with `tombstones`, deletes (of feed $3) owners $1 have at
    versions >= $2, by owner (none: left out, or 0). With an index on the owner column
    each owner is counted up to `cap` only, enough to tell those with little to catch up
    from those with much, without reading the whole of a large one; without one, in one
    pass. Nothing is rendered."""
    if not feed.owner_indexed:
        gone = (
            " union all select t.owner_id from streamer.tombstones t"
            " where t.feed = $3 and t.owner_id = any($1::text[]) and t.version >= $2"
        )
        return (
            f'select owner, count(*)::int as n from (select r."{feed.owner_column}"::text'
            f" as owner from {feed.relation} r where {owner_in(feed, '$1')}"
            f" and r.streamer_version >= $2{gone if tombstones else ''}) c group by owner"
        )
    gone = (
        " + (select count(*) from (select from streamer.tombstones t"
        " where t.feed = $3 and t.owner_id = o.owner and t.version >= $2"
        f" limit {cap:d}) y)"
    )
    return (
        f"select o.owner, (select count(*) from (select from {feed.relation} r"
        f' where r."{feed.owner_column}" = o.owner::{feed.owner_type}'
        f" and r.streamer_version >= $2 limit {cap:d}) x){gone if tombstones else ''}"
        " as n from unnest($1::text[]) o(owner)"
    )


def members(feed: Feed, where: str) -> str:
    """The ids of owners $1's rows that a shaped stream's `where` takes (parameters from $2)."""
    return f"select r.id::text from {feed.relation} r where {owner_in(feed, '$1')} and {where}"
