"""What one stream sees of a feed: its shape (streamer/shapes.py) over the owners it
follows, and how a row looks through it.

Every event a stream is sent carries a cursor that names its view: a plain number for
every row of the token's `sub` (as cursors always were), `<number>.<key>` for a shaped
stream or one of a feed with an owner claim, where the key digests the shape and the
owners. A cursor resumed under another view is honoured by a reset and a snapshot: the
stream cannot tell what the client holds of rows outside the view it was issued under.

A filtered view knows which of its rows the client holds (Subscriber.held): a row that
stops matching is a delete only for a stream that has it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from streamer.changes import Row
from streamer.shapes import EVERYTHING, Shape, load_row

KEY_LENGTH = 16  # hex digits of a view's key in its cursors


@dataclass(frozen=True, slots=True)
class View:
    shape: Shape = EVERYTHING
    suffix: str = ""  # what its cursors end with: "" or "." + its key

    @property
    def filtered(self) -> bool:
        return bool(self.shape.filters)

    @property
    def plain(self) -> bool:
        """Every row as it is: nothing to evaluate or project."""
        return not self.shape.filters and self.shape.select is None

    def cursor(self, cursor: str) -> str:
        return cursor + self.suffix

    def text(self, row: Row, values: dict[str, Any] | None = None) -> str:
        """The row's JSON as this view sends it (its selected columns)."""
        if self.shape.select is None:
            return row.json
        return dump(self.shape.project(load_row(row.json) if values is None else values))


PLAIN = View()


def view(shape: Shape, owners: tuple[str, ...], claimed: bool) -> View:
    """The view of a stream with this shape over these owners; `claimed`: the feed's
    owners come from a claim (so the owners belong to the view: a token whose claim
    changed resumes with a reset)."""
    if not claimed and shape.key == "":
        return PLAIN
    named = shape.canonical + ("\n" + ",".join(owners) if claimed else "")
    return View(shape, "." + hashlib.sha256(named.encode()).hexdigest()[:KEY_LENGTH])


def split_cursor(raw: str) -> tuple[str, str]:
    """A cursor's number and its view's suffix ("" for a plain one)."""
    number, dot, key = raw.strip().partition(".")
    return number, dot + key


def dump(value: Any) -> str:
    """JSON as Postgres renders jsonb (", " and ": "), numbers with their digits kept."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dict):
        items = (json.dumps(k, ensure_ascii=False) + ": " + dump(v) for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(dump(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)
