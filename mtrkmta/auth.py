"""SMTP AUTH credentials: a twisted.cred checker over a file of salted password hashes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from pathlib import Path

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

SCHEME = "pbkdf2-sha256"
DEFAULT_ITERATIONS = 200_000


class PasswordFileError(ValueError):
    """The users file has a line that cannot be understood."""


def hash_password(
    password: str, *, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None
) -> str:
    """The stored form of ``password``: ``pbkdf2-sha256$ITERATIONS$SALT$HASH`` (base64)."""
    salt = secrets.token_bytes(16) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    b64 = base64.b64encode
    return f"{SCHEME}${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: bytes, stored: str) -> bool:
    """True when ``password`` matches the stored hash (constant-time comparison)."""
    try:
        scheme, iterations, salt, digest = stored.split("$")
        if scheme != SCHEME:
            return False
        expected = base64.b64decode(digest, validate=True)
        actual = hashlib.pbkdf2_hmac(
            "sha256", password, base64.b64decode(salt, validate=True), int(iterations)
        )
    except ValueError:
        return False
    return hmac.compare_digest(expected, actual)


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

    Reading the small file and the deliberately slow hash both run in the thread
    pool, so the reactor never waits; edits take effect without a restart.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, path: Path, reactor: IReactorFromThreads, threadpool: ThreadPool) -> None:
        self.path = path
        self._reactor = reactor
        self._threadpool = threadpool

    def requestAvatarId(self, credentials: IUsernamePassword) -> Deferred[bytes]:
        return deferToThreadPool(
            self._reactor,
            self._threadpool,
            self._check,
            credentials.username,
            credentials.password,
        )

    def _check(self, username: bytes, password: bytes) -> bytes:
        users = parse_users(self.path.read_text("utf-8"), str(self.path))
        try:
            name = username.decode("utf-8")
        except UnicodeDecodeError:
            raise UnauthorizedLogin() from None
        stored = users.get(name)
        if stored is None:
            # Spend the same time as for a known user: no user-enumeration oracle.
            verify_password(password, hash_password("", salt=b"\0" * 16))
            raise UnauthorizedLogin()
        if not verify_password(password, stored):
            raise UnauthorizedLogin()
        return username
