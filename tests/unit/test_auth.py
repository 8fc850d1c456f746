"""The users-file checker: one PBKDF2 per attempt whether the user exists or not, and a bound
on the checks waiting for its threads."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.testing import MemoryReactorClock

from mtrkmta.auth import (
    DEFAULT_ITERATIONS,
    ChecksBusy,
    PasswordFileChecker,
    hash_password,
    usual_cost,
)


class CountingDerive:
    """hashlib.pbkdf2_hmac, noting the iteration count of every call."""

    def __init__(self) -> None:
        self.iterations: list[int] = []

    def __call__(self, name: str, password: bytes, salt: bytes, iterations: int) -> bytes:
        self.iterations.append(iterations)
        return hashlib.pbkdf2_hmac(name, password, salt, iterations)


class QueuedPool:
    """The thread-pool side of deferToThreadPool: work waits until ``run`` (no threads)."""

    def __init__(self) -> None:
        self.queue: list[tuple] = []

    def callInThreadWithCallback(self, on_result, fn, *args, **kwargs):
        self.queue.append((on_result, fn, args, kwargs))

    def run(self) -> None:
        queue, self.queue = self.queue, []
        for on_result, fn, args, kwargs in queue:
            try:
                on_result(True, fn(*args, **kwargs))
            except Exception as error:  # deferToThreadPool hands failures over as Failures
                from twisted.python.failure import Failure

                on_result(False, Failure(error))


class ThreadsReactor(MemoryReactorClock):
    """A fake reactor whose callFromThread runs at once (QueuedPool runs in this thread)."""

    def callFromThread(self, fn, *args, **kwargs):
        fn(*args, **kwargs)


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    path.write_text(
        f"alice:{hash_password('secret', iterations=1000)}\n"
        f"bob:{hash_password('hunter2', iterations=1000)}\n"
        f"carol:{hash_password('x', iterations=2000)}\n"
    )
    return path


def checker_for(users: Path, derive=hashlib.pbkdf2_hmac, max_pending: int = 16):
    return PasswordFileChecker(
        users, ThreadsReactor(), QueuedPool(), max_pending=max_pending, derive=derive
    )


# -- reproduction 2: no user-enumeration oracle ------------------------------------------------


def test_known_and_unknown_users_cost_one_pbkdf2_of_the_same_iterations(users):
    derive = CountingDerive()
    checker = checker_for(users, derive)
    with pytest.raises(UnauthorizedLogin):
        checker.check(b"alice", b"wrong")
    known = list(derive.iterations)
    derive.iterations.clear()
    with pytest.raises(UnauthorizedLogin):
        checker.check(b"mallory", b"wrong")
    assert known == derive.iterations == [1000]  # the count most users of the file have


def test_the_right_password_costs_one_pbkdf2_too(users):
    derive = CountingDerive()
    assert checker_for(users, derive).check(b"alice", b"secret") == b"alice"
    assert derive.iterations == [1000]


def test_the_dummy_hash_follows_the_file(users):
    derive = CountingDerive()
    checker = checker_for(users, derive)
    users.write_text(f"alice:{hash_password('secret', iterations=3000)}\n")
    with pytest.raises(UnauthorizedLogin):
        checker.check(b"mallory", b"secret")
    assert derive.iterations == [3000]


def test_the_dummy_hash_matches_no_password(users):
    checker = checker_for(users)
    dummy = checker.dummy_hash([])
    assert dummy.startswith(f"pbkdf2-sha256${DEFAULT_ITERATIONS}$")
    assert dummy != hash_password("", salt=b"\0" * 16)  # no longer a hash of a known password
    assert checker_for(users).dummy_hash([]) != dummy  # random per checker


def test_usual_cost():
    five, seven = (hash_password("x", iterations=n) for n in (5, 7))
    assert usual_cost([]) == ("pbkdf2-sha256", DEFAULT_ITERATIONS)
    assert usual_cost([five, seven]) == ("pbkdf2-sha256", 7)
    assert usual_cost([five] * 2 + [seven]) == ("pbkdf2-sha256", 5)


# -- reproduction 3: a bound on the checks waiting for the checker's threads --------------------


def test_checks_beyond_max_pending_fail_at_once_until_some_finish(users):
    checker = checker_for(users, max_pending=2)
    pool = checker.threadpool
    results: list[object] = []
    for _ in range(3):
        d = checker.requestAvatarId(UsernamePassword(b"alice", b"secret"))
        d.addBoth(results.append)
    assert results[0].check(ChecksBusy)  # the third failed at once
    assert checker.pending == 2
    pool.run()
    assert results[1:] == [b"alice", b"alice"]
    assert checker.pending == 0
    d = checker.requestAvatarId(UsernamePassword(b"alice", b"wrong"))
    d.addBoth(results.append)
    pool.run()
    assert results[-1].check(UnauthorizedLogin)
    assert checker.pending == 0
