"""Queue ids: length, alphabet, time order, uniqueness and the injectable clock."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtrkmta.spool.queueid import ALPHABET, LENGTH, QueueIdGenerator


def test_shape_and_alphabet() -> None:
    qid = QueueIdGenerator()()
    assert len(qid) == LENGTH == 20
    assert set(qid) <= set(ALPHABET)
    assert qid == qid.lower()


def test_sorted_by_time_even_against_random_part() -> None:
    t = [1_700_000_000_000_000_000]
    bits = iter([(1 << 45) - 1, 0])
    gen = QueueIdGenerator(clock=lambda: t[0], randbits=lambda k: next(bits))
    first = gen()
    t[0] += 1000  # one microsecond later
    second = gen()
    assert first < second
    assert first[-9:] == "zzzzzzzzz" and second[-9:] == "000000000"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=2**62), min_size=2, max_size=30))
def test_strictly_increasing_whatever_the_clock_does(times: list[int]) -> None:
    clock = iter(times)
    gen = QueueIdGenerator(clock=lambda: next(clock), randbits=lambda k: 0)
    ids = [gen() for _ in times]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_timestamp_decodes_the_clock() -> None:
    gen = QueueIdGenerator(clock=lambda: 1_234_567_890_123_456_789)
    assert QueueIdGenerator.timestamp(gen()) == pytest.approx(1_234_567_890.123456)


def test_timestamp_rejects_foreign_ids() -> None:
    with pytest.raises(ValueError):
        QueueIdGenerator.timestamp("ABC")
    with pytest.raises(ValueError):
        QueueIdGenerator.timestamp("u" * LENGTH)  # 'u' is not in the alphabet


def test_random_bits_come_from_the_injected_source() -> None:
    requested: list[int] = []

    def randbits(k: int) -> int:
        requested.append(k)
        return 31

    qid = QueueIdGenerator(clock=lambda: 0, randbits=randbits)()
    assert requested == [45]
    assert qid == "0" * 11 + "00000000z"


def test_unique_across_threads_with_a_frozen_clock() -> None:
    gen = QueueIdGenerator(clock=lambda: 5_000_000_000, randbits=lambda k: 7)
    out: list[str] = []

    def worker() -> None:
        out.extend(gen() for _ in range(500))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(out) == len(set(out)) == 2000


def test_two_generators_differ_by_random_part() -> None:
    a = QueueIdGenerator(clock=lambda: 10**18)()
    b = QueueIdGenerator(clock=lambda: 10**18)()
    assert a[:11] == b[:11]
    assert a != b
