"""Values of a column's type, as a stream's filters compare them (streamer/shapes.py).

A filter's value (text from a URL) is checked and turned into a key and a canonical text;
a row's value (as Postgres renders it in JSON) into a key of the same kind. Keys compare
in Python as the column's type compares in Postgres: numbers exactly (NaN equal to itself
and above infinity, as Postgres orders it), timestamps as microseconds on one time line
(any year Postgres allows, BC included), text by code point (`COLLATE "C"`). The canonical
text is what SQL receives, so that a filter in Python and in SQL means one thing.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Context, Decimal
from typing import Any

SPACE = " \t\n\r\f\v"  # what Postgres's input functions skip around a number
# Postgres's infinite timestamps and dates sort beyond every finite one: the last
# timestamp, 294276-12-31, is about 2**63 microseconds after 1970.
INFINITE = 2**64
DAY = 86_400_000_000  # microseconds
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NAIVE_EPOCH, _EPOCH_DAY = _EPOCH.replace(tzinfo=None), _EPOCH.toordinal()
_MICROSECOND = timedelta(microseconds=1)


def show(raw: str, limit: int = 60) -> str:
    """A value in an error message: quoted, and cut short when long."""
    return '"' + (raw if len(raw) <= limit else raw[:limit] + "…") + '"'


@dataclass(frozen=True)
class Kind:
    """How a family of Postgres types compares.

    `parse` turns a filter's value into (key, canonical text) or raises ValueError saying
    what is wrong; `load` turns a row's JSON value into a key (TypeError or ValueError
    when the value is not of the type).
    """

    name: str  # the type, as error messages name it
    sql_type: str  # what SQL casts a value to
    parse: Callable[[str], tuple[Any, str]]
    load: Callable[[Any], Any]
    text: bool = False  # like and ilike apply; ordered by code point


def _text(raw: str) -> tuple[str, str]:
    if "\x00" in raw:
        raise ValueError(f"{show(raw)} contains a NUL character, which text cannot hold")
    try:
        raw.encode()
    except UnicodeEncodeError:
        raise ValueError(f"{show(raw)} is not valid Unicode") from None
    return raw, raw


def _load_text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(value)
    return value


_INTEGER = re.compile(r"[+-]?[0-9]+")


def _integers(name: str, bits: int) -> Kind:
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def parse(raw: str) -> tuple[int, str]:
        if not _INTEGER.fullmatch(raw.strip(SPACE)):
            raise ValueError(f"{show(raw)} is not an integer")
        value = int(raw.strip(SPACE))
        if not low <= value <= high:
            raise ValueError(f"{show(raw)} is out of range for {name} ({low} to {high})")
        return value, str(value)

    def load(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(value)
        return value

    return Kind(name, name, parse, load)


_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_SPECIAL = frozenset({"nan", "inf", "infinity", "-inf", "-infinity"})


def _decimal(raw: str) -> Decimal:
    """A number as Postgres's input functions read it (ASCII digits, an exponent, NaN and
    the infinities), exactly."""
    text = raw.strip(SPACE)
    if text.lower().removeprefix("+") in _SPECIAL:
        return Decimal(text.lower().removeprefix("+"))
    if not _NUMBER.fullmatch(text):
        raise ValueError(f"{show(raw)} is not a number")
    return Decimal(text)


def _ranked(number: Any) -> tuple[int, Any]:
    """Postgres's order of numbers: -Infinity, the finite ones, Infinity, then NaN (equal to
    itself)."""
    if number != number:
        return (2, 0)
    if number in (float("inf"), float("-inf")):
        return (1 if number > 0 else -1, 0)
    return (0, number)


def _parse_numeric(raw: str) -> tuple[tuple[int, Any], str]:
    number = _decimal(raw)
    exponent = number.as_tuple().exponent
    if isinstance(exponent, int):  # a finite number
        if number.adjusted() > 131071 or exponent < -16383:
            raise ValueError(f"{show(raw)} is out of range for numeric")
        number = number.normalize(Context(prec=max(1, len(number.as_tuple().digits))))
        number = number if number else Decimal(0)
    return _ranked(number), str(number)


def _load_numeric(value: Any) -> tuple[int, Any]:
    if isinstance(value, bool) or not isinstance(value, Decimal | int | float | str):
        raise TypeError(value)
    # A float is what json.loads makes of a number without parse_float=Decimal: its repr
    # is Postgres's text when that had at most 17 significant digits.
    return _ranked(Decimal(repr(value) if isinstance(value, float) else value))


def _floats(name: str, single: bool) -> Kind:
    """real and double precision. A real's filter value is rounded to a double first: for a
    value of more digits than a double holds, right beside the middle of two reals, that
    can make it the other real than Postgres would read (SQL receives ours, so `matches`
    and `where` still agree)."""

    def rounded(number: float) -> float:
        """A real's value: the float4 nearest (struct raises OverflowError beyond it)."""
        if not single:
            return number
        (nearest,) = struct.unpack("f", struct.pack("f", number))
        return float(nearest)

    def parse(raw: str) -> tuple[tuple[int, Any], str]:
        exact = _decimal(raw)
        try:
            number = rounded(float(exact))
        except OverflowError:
            number = float("inf")
        out_of_range = number in (float("inf"), float("-inf")) or (exact != 0 and number == 0)
        if exact.is_finite() and out_of_range:
            raise ValueError(f"{show(raw)} is out of range for {name}")
        if number != number or not exact.is_finite():
            return _ranked(number), str(exact)
        number = number or 0.0  # -0 equals 0
        return _ranked(number), repr(number)

    def load(value: Any) -> tuple[int, Any]:
        if isinstance(value, bool) or not isinstance(value, Decimal | int | float | str):
            raise TypeError(value)
        return _ranked(rounded(float(value)))

    return Kind(name, name, parse, load)


_TRUE = {"t", "true", "y", "yes", "on", "1"}
_FALSE = {"f", "false", "n", "no", "off", "0"}


def _parse_boolean(raw: str) -> tuple[bool, str]:
    word = raw.strip(SPACE).lower()
    if word not in _TRUE | _FALSE:
        raise ValueError(f"{show(raw)} is not a boolean (true or false)")
    return word in _TRUE, "true" if word in _TRUE else "false"


def _load_boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(value)
    return value


_HEX32 = re.compile(r"[0-9a-fA-F]{32}")


def _parse_uuid(raw: str) -> tuple[str, str]:
    body = raw[1:-1] if raw.startswith("{") and raw.endswith("}") else raw
    digits = body.replace("-", "")
    if not _HEX32.fullmatch(digits) or body.startswith("-") or "--" in body:
        raise ValueError(f"{show(raw)} is not a UUID")
    d = digits.lower()
    canonical = f"{d[:8]}-{d[8:12]}-{d[12:16]}-{d[16:20]}-{d[20:]}"
    return canonical, canonical


def _load_uuid(value: Any) -> str:
    return _load_text(value).lower()


_MOMENT = re.compile(
    r"(?P<y>[0-9]{4,7})-(?P<m>[0-9]{2})-(?P<d>[0-9]{2})"
    r"(?:[Tt ](?P<H>[0-9]{2}):(?P<M>[0-9]{2})(?::(?P<S>[0-9]{2})(?:\.(?P<f>[0-9]{1,6}))?)?)?"
    r"(?P<z>[Zz]|[+-][0-9]{2}(?::?[0-9]{2}(?::?[0-9]{2})?)?)?"
    r"(?P<bc> [Bb][Cc])?"
)


def days(year: int, month: int, day: int) -> int:
    """Days from 1970-01-01 to a date of any year (H. Hinnant's days_from_civil)."""
    year -= month <= 2
    era, year_of_era = divmod(year, 400)
    day_of_year = (153 * ((month + 9) % 12) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146097 + day_of_era - 719468


def civil(count: int) -> tuple[int, int, int]:
    """The date `count` days from 1970-01-01: the inverse of `days`."""
    era, day_of_era = divmod(count + 719468, 146097)
    year_of_era = (
        day_of_era - day_of_era // 1460 + day_of_era // 36524 - day_of_era // 146096
    ) // 365
    day_of_year = day_of_era - (365 * year_of_era + year_of_era // 4 - year_of_era // 100)
    shifted = (5 * day_of_year + 2) // 153
    month = shifted + 3 if shifted < 10 else shifted - 9
    day = day_of_year - (153 * shifted + 2) // 5 + 1
    return year_of_era + era * 400 + (month <= 2), month, day


# The range Postgres allows (4714-11-24 BC is year -4713: year 0 is 1 BC).
FIRST_DAY, LAST_DATE = days(-4713, 11, 24), days(5874897, 12, 31)
AFTER_LAST_TIMESTAMP = days(294277, 1, 1)


def _moment(raw: str, name: str, time: bool, zone: bool) -> int:
    """Microseconds (days for a date) from 1970-01-01 of an ISO 8601 date or timestamp;
    UTC when a timestamp with time zone names no offset."""
    text = raw.strip(SPACE)
    if text.lower() in ("infinity", "+infinity", "-infinity"):
        return -INFINITE if text.startswith("-") else INFINITE
    match = _MOMENT.fullmatch(text)
    if not match or (not time and (match["H"] or match["z"])):
        example = "2026-01-31T12:00:00Z" if time else "2026-01-31"
        raise ValueError(f"{show(raw)} is not a {name} (ISO 8601: {example}; send + as %2B)")
    if match["z"] and not zone:
        raise ValueError(f"{show(raw)} has a time zone offset, which a {name} has not")
    g = {
        key: int(value or 0)
        for key, value in match.groupdict().items()
        if key not in ("z", "bc", "f")
    }
    year = 1 - g["y"] if match["bc"] else g["y"]
    count = days(year, g["m"], g["d"])
    valid = g["y"] >= 1 and civil(count) == (year, g["m"], g["d"])
    if not valid or g["H"] > 23 or g["M"] > 59 or g["S"] > 59:
        raise ValueError(f"{show(raw)} is not a valid date or time")
    if not time:
        return count
    offset = _offset(raw, match["z"] or "Z")
    seconds = g["H"] * 3600 + g["M"] * 60 + g["S"] - offset
    return (count * 86400 + seconds) * 1_000_000 + int((match["f"] or "").ljust(6, "0"))


def _offset(raw: str, text: str) -> int:
    if text in ("Z", "z"):
        return 0
    digits = text[1:].replace(":", "")
    hours, minutes, seconds = int(digits[:2]), int(digits[2:4] or 0), int(digits[4:] or 0)
    if hours > 15 or minutes > 59 or seconds > 59:
        raise ValueError(f"{show(raw)} has a time zone offset out of range")
    return (-1 if text[0] == "-" else 1) * (hours * 3600 + minutes * 60 + seconds)


def _render_moment(value: int, time: bool, zone: bool) -> str:
    if abs(value) == INFINITE:
        return "-infinity" if value < 0 else "infinity"
    count, rest = divmod(value, DAY) if time else (value, 0)
    year, month, day = civil(count)
    text = f"{max(year, 1 - year):04d}-{month:02d}-{day:02d}"
    if time:
        seconds, micros = divmod(rest, 1_000_000)
        text += f"T{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        text += f".{micros:06d}".rstrip("0") if micros else ""
        text += "+00:00" if zone else ""
    return text + (" BC" if year < 1 else "")


def _moments(name: str, time: bool, zone: bool) -> Kind:
    low, high = (
        (FIRST_DAY * DAY, AFTER_LAST_TIMESTAMP * DAY - 1) if time else (FIRST_DAY, LAST_DATE)
    )

    def parse(raw: str) -> tuple[int, str]:
        value = _moment(raw, name, time, zone)
        if abs(value) != INFINITE and not low <= value <= high:
            raise ValueError(f"{show(raw)} is out of range for {name}")
        return value, _render_moment(value, time, zone)

    def load(value: Any) -> int:
        text = _load_text(value)
        try:  # the years 1 to 9999 as Postgres renders them, by the standard library's C
            if not time:
                return date.fromisoformat(text).toordinal() - _EPOCH_DAY
            moment = datetime.fromisoformat(text)
            return (moment - (_EPOCH if moment.tzinfo else _NAIVE_EPOCH)) // _MICROSECOND
        except (ValueError, OverflowError):
            return _moment(text, name, time, True)

    return Kind(name, name, parse, load)


KINDS: dict[str, Kind] = {
    "text": Kind("text", "text", _text, _load_text, text=True),
    "character varying": Kind("character varying", "text", _text, _load_text, text=True),
    "smallint": _integers("smallint", 16),
    "integer": _integers("integer", 32),
    "bigint": _integers("bigint", 64),
    "numeric": Kind("numeric", "numeric", _parse_numeric, _load_numeric),
    "real": _floats("real", single=True),
    "double precision": _floats("double precision", single=False),
    "boolean": Kind("boolean", "boolean", _parse_boolean, _load_boolean),
    "uuid": Kind("uuid", "uuid", _parse_uuid, _load_uuid),
    "timestamp with time zone": _moments("timestamp with time zone", time=True, zone=True),
    "timestamp without time zone": _moments("timestamp without time zone", time=True, zone=False),
    "date": _moments("date", time=False, zone=False),
}
