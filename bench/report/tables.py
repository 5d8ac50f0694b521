"""A table described as data: columns, each a header and how to render one row's cell,
over rows taken from results.json; `table()` lays any of them out as markdown."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

Row = dict[str, Any]


@dataclass(frozen=True)
class Column:
    header: str
    cell: Callable[[Row], str]


def table(columns: Sequence[Column], rows: Iterable[Row]) -> list[str]:
    lines = ["| " + " | ".join(c.header for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(c.cell(row) for c in columns) + " |" for row in rows]
    return lines


# -- how numbers read -------------------------------------------------------------------


def n(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def ms(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.2f}" if abs(value) < 10 else f"{value:,.0f}"


def cpu(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}%"


def verdict(ok: bool) -> str:
    return "**pass**" if ok else "**miss**"


def refused(errors: dict[str, int]) -> str:
    return ", ".join(f"{count} {error}" for error, count in errors.items()) or "0"


# -- cells of one field ------------------------------------------------------------------


def text(key: str) -> Callable[[Row], str]:
    return lambda row: str(row[key])


def count(key: str) -> Callable[[Row], str]:
    return lambda row: f"{row[key]:,}"


def number(key: str, digits: int = 0) -> Callable[[Row], str]:
    return lambda row: n(row.get(key), digits)


def millis(key: str) -> Callable[[Row], str]:
    return lambda row: ms(row.get(key))


def percent(key: str) -> Callable[[Row], str]:
    return lambda row: cpu(row.get(key))


def of(columns: Iterable[tuple[str, Callable[[Row], str]]]) -> tuple[Column, ...]:
    return tuple(Column(header, cell) for header, cell in columns)
