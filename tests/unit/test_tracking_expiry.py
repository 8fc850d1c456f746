"""Pure retention rules of the tracking store: effective expiry and the retention policy."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtrkmta.config import DAY, DEFAULT_RETENTION, MAX_RETENTION
from mtrkmta.tracking.store import check_retention, effective_expiry, whole_seconds

ARRIVAL = 1_700_000_000


def expiry(arrival: float, requested: int | None) -> int:
    return effective_expiry(
        arrival, requested, default_retention=DEFAULT_RETENTION, max_retention=MAX_RETENTION
    )


def test_project_defaults():
    # doc/conformance.rst 3885-P6: default 9 days, cap 30 days; RFC 3885 §3.1: SHOULD default
    # 8-10 days.
    assert DEFAULT_RETENTION == 9 * 86400
    assert MAX_RETENTION == 30 * 86400
    assert 8 * DAY <= DEFAULT_RETENTION <= 10 * DAY


def test_no_timeout_uses_default():
    # RFC 3885 §3.1: no MTRK timeout -> the local default.
    assert expiry(ARRIVAL, None) == ARRIVAL + 9 * DAY


def test_requested_timeout_counts_from_arrival_here():
    # RFC 3885 §3.1: the timeout is measured from receipt at this server.
    assert expiry(ARRIVAL, 3600) == ARRIVAL + 3600


def test_requested_timeout_above_cap_is_silently_capped():
    # RFC 3885 §3.1 (MAY): silent upper cap.
    assert expiry(ARRIVAL, 999_999_999) == ARRIVAL + 30 * DAY


def test_zero_timeout_expires_at_arrival():
    assert expiry(ARRIVAL, 0) == ARRIVAL


def test_default_above_cap_is_capped():
    assert (
        effective_expiry(ARRIVAL, None, default_retention=40 * DAY, max_retention=20 * DAY)
        == ARRIVAL + 20 * DAY
    )


def test_fractional_arrival_is_truncated_to_its_second():
    assert whole_seconds(ARRIVAL + 0.999) == ARRIVAL
    assert expiry(ARRIVAL + 0.999, 10) == ARRIVAL + 10


@given(
    arrival=st.floats(min_value=0, max_value=4e9, allow_nan=False),
    requested=st.none() | st.integers(min_value=0, max_value=999_999_999),
    default=st.integers(min_value=DAY, max_value=100 * DAY),
    cap=st.integers(min_value=DAY, max_value=100 * DAY),
)
def test_expiry_is_arrival_plus_min_of_requested_or_default_and_cap(
    arrival, requested, default, cap
):
    # doc/conformance.rst 3885-P6: effective expiry = arrival + min(requested or default, cap).
    result = effective_expiry(arrival, requested, default_retention=default, max_retention=cap)
    wanted = default if requested is None else requested
    assert result == whole_seconds(arrival) + min(wanted, cap)
    assert whole_seconds(arrival) <= result <= whole_seconds(arrival) + cap


@pytest.mark.parametrize(
    ("default", "cap"),
    [(DAY - 1, MAX_RETENTION), (DEFAULT_RETENTION, DAY - 1), (0, 0)],
)
def test_retention_below_one_day_is_refused(default, cap):
    # RFC 3885 §3.1 (MUST): default >= 1 day and cap >= 1 day.
    with pytest.raises(ValueError, match="at least one day"):
        check_retention(default, cap)


def test_retention_of_exactly_one_day_is_allowed():
    check_retention(DAY, DAY)
