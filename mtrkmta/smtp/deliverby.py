"""Parse and render the DELIVERBY extension's BY= value and EHLO line (RFC 2852), sans-IO."""

from __future__ import annotations

import re

from mtrkmta.envelope import DeliverBy

MAX_BY_TIME = 999_999_999
"""RFC 2852 §4: -999,999,999 <= by-time <= +999,999,999 seconds."""

# RFC 2852 §4: by-value = by-time ";" by-mode [by-trace];
# by-time = ["-" / "+"] 1*9digit; by-mode = "N" / "R"; by-trace = "T".
_BY_VALUE = re.compile(r"([-+]?)([0-9]{1,9});([NRnr])([Tt]?)")


class DeliverByError(ValueError):
    """A BY= value that is malformed, or that RFC 2852 §4 calls a syntax error."""


def parse_by(value: str) -> DeliverBy:
    """Decode a BY= esmtp-value such as ``"120;RT"`` (RFC 2852 §4).

    Raises DeliverByError for a malformed value and for a zero or negative by-time
    with by-mode R, which RFC 2852 §4 calls a syntax error (501 5.5.4).
    """
    match = _BY_VALUE.fullmatch(value)
    if match is None:
        raise DeliverByError(f"malformed BY value: {value!r}")
    sign, digits, mode, trace = match.groups()
    seconds = -int(digits) if sign == "-" else int(digits)
    mode = mode.upper()
    if mode == "R" and seconds <= 0:
        raise DeliverByError("a by-mode of R needs a positive by-time")
    return DeliverBy(seconds, mode, bool(trace))


def render_by(seconds: int, mode: str, trace: bool) -> str:
    """The BY= esmtp-value for ``seconds`` remaining, clamped to the ±999,999,999 of RFC 2852 §4."""
    clamped = max(-MAX_BY_TIME, min(MAX_BY_TIME, seconds))
    return f"{clamped};{mode}{'T' if trace else ''}"


def ehlo_line(min_by_time: int) -> str:
    """The EHLO line: ``DELIVERBY`` alone for 0, else ``DELIVERBY <min-by-time>`` (RFC 2852 §2)."""
    if not 0 <= min_by_time <= MAX_BY_TIME:
        raise ValueError(f"min-by-time out of range 0..{MAX_BY_TIME}: {min_by_time}")
    return f"DELIVERBY {min_by_time}" if min_by_time else "DELIVERBY"


def parse_min_by_time(param: str) -> int | None:
    """The min-by-time of a server's DELIVERBY parameter, None when absent (RFC 2852 §2(3))."""
    first = param.split(",", 1)[0].strip()
    if re.fullmatch(r"[0-9]{1,9}", first):
        return int(first)
    return None
