"""SMTP AUTH credentials: a twisted.cred checker over a file of salted password hashes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

SCHEME = "pbkdf2-sha256"
DEFAULT_ITERATIONS = 200_000
DEFAULT_MAX_PENDING = 16  # auth.max_pending

# hashlib.pbkdf2_hmac's shape: (hash name, password, salt, iterations) -> derived key.
Derive = Callable[[str, bytes, bytes, int], bytes]


class PasswordFileError(ValueError):
    """The users file has a line that cannot be understood."""


class ChecksBusy(Exception):
    """Too many password checks are already waiting for the checker's threads."""


def hash_password(
    password: str, *, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None
) -> str:
    """The stored form of ``password``: ``pbkdf2-sha256$ITERATIONS$SALT$HASH`` (base64)."""
    salt = secrets.token_bytes(16) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    return _stored(iterations, salt, digest)


def _stored(iterations: int, salt: bytes, digest: bytes) -> str:
    b64 = base64.b64encode
    return f"{SCHEME}${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: bytes, stored: str, *, derive: Derive = hashlib.pbkdf2_hmac) -> bool:
    """True when ``password`` matches the stored hash (constant-time comparison).

    Runs ``derive`` (PBKDF2) exactly once for a well-formed ``stored``.
    """
    try:
        scheme, iterations, salt, digest = stored.split("$")
        if scheme != SCHEME:
            return False
        expected = base64.b64decode(digest, validate=True)
        actual = derive("sha256", password, base64.b64decode(salt, validate=True), int(iterations))
    except ValueError:
        return False
    return hmac.compare_digest(expected, actual)


def usual_iterations(stored: Iterable[str]) -> int:
    """The iteration count most of the ``stored`` hashes use (the highest on a tie);
    DEFAULT_ITERATIONS when there is none."""
    counts: Counter[int] = Counter()
    for value in stored:
        fields = value.split("$")
        if len(fields) == 4 and fields[1].isdigit():
            counts[int(fields[1])] += 1
    if not counts:
        return DEFAULT_ITERATIONS
    return max(counts.items(), key=lambda item: (item[1], item[0]))[0]


def parse_users(text: str, source: str = "users file") -> dict[str, str]:
    """Parse ``user:hash`` lines; ``#`` starts a comment line; blank lines are ignored."""
    users: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, stored = line.partition(":")
        if not sep or not user or not stored.startswith(SCHEME + "$"):
            raise PasswordFileError(f"{source}:{number}: expected 'user:{SCHEME}$...'")
        users[user] = stored
    return users


@implementer(ICredentialsChecker)
class PasswordFileChecker:
    """Checks username/password pairs against ``path``, re-read on every attempt.

    Reading the small file and the deliberately slow hash run in ``threadpool``,
    so the reactor never waits; edits take effect without a restart. That pool
    should be the checker's own (``auth.threads``): password checks are CPU work
    that clients can ask for at will, and must not delay anything else. At most
    ``max_pending`` checks may be running or waiting at once; beyond that
    ``requestAvatarId`` fails at once with ChecksBusy.

    Known and unknown users cost the same, exactly one PBKDF2 with the same
    iteration count, so that timing tells no one which users exist: an unknown
    user is checked against a dummy hash made of random bytes drawn once per
    checker, at the iteration count most users of the file have. ``derive`` is
    the PBKDF2 function (tests pass one that counts its calls).
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(
        self,
        path: Path,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        derive: Derive = hashlib.pbkdf2_hmac,
    ) -> None:
        self.path = path
        self.max_pending = max_pending
        self.threadpool = threadpool
        self._reactor = reactor
        self._derive = derive
        self._pending = 0
        self._dummy_salt = secrets.token_bytes(16)
        self._dummy_digest = secrets.token_bytes(hashlib.sha256().digest_size)

    @property
    def pending(self) -> int:
        """Checks running or waiting for a thread."""
        return self._pending

    def requestAvatarId(self, credentials: IUsernamePassword) -> Deferred[bytes | tuple[()]]:
        if self._pending >= self.max_pending:
            return fail(ChecksBusy())
        self._pending += 1
        d: Deferred[bytes | tuple[()]] = deferToThreadPool(
            self._reactor,
            self.threadpool,
            self.check,
            credentials.username,
            credentials.password,
        )

        def done(result: object) -> object:
            self._pending -= 1
            return result

        return d.addBoth(done)

    def check(self, username: bytes, password: bytes) -> bytes:
        """The avatar id (``username``), or UnauthorizedLogin. Blocking: run it in the pool."""
        users = parse_users(self.path.read_text("utf-8"), str(self.path))
        try:
            name = username.decode("utf-8")
        except UnicodeDecodeError:
            raise UnauthorizedLogin() from None
        stored = users.get(name)
        if stored is None:
            # The same work as for a known user: no user-enumeration oracle.
            verify_password(password, self.dummy_hash(users.values()), derive=self._derive)
            raise UnauthorizedLogin()
        if not verify_password(password, stored, derive=self._derive):
            raise UnauthorizedLogin()
        return username

    def dummy_hash(self, stored: Iterable[str]) -> str:
        """A hash no password matches, at the usual iteration count of ``stored``."""
        return _stored(usual_iterations(stored), self._dummy_salt, self._dummy_digest)
