"""SMTP AUTH credentials: a twisted.cred checker over a file of salted password hashes."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
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

#: The schemes of Dovecot's ``doveadm pw`` that mtrkmta verifies too, so that one users
#: file can serve both. ``{CRYPT}`` is accepted when its hash is a SHA-crypt one.
SHA512_CRYPT = "SHA512-CRYPT"
SHA256_CRYPT = "SHA256-CRYPT"
SSHA512 = "SSHA512"
SSHA256 = "SSHA256"
DOVECOT_PBKDF2 = "PBKDF2"  # Dovecot's: PBKDF2-HMAC-SHA1, ``$1$SALT$ROUNDS$HEX``
#: The schemes ``mtrkmta passwd --scheme`` writes.
WRITABLE_SCHEMES = (SCHEME, SHA512_CRYPT)

#: The highest work factor a users file may ask for: a line beyond it is refused when the
#: file is loaded, so that a mistyped or hostile line cannot make every login attempt (of
#: that user, and, through the dummy hash, of unknown ones) occupy a CPU for minutes.
#: SHA-crypt rounds (the specification allows up to 999,999,999; Dovecot and glibc default
#: to 5,000) and PBKDF2 iterations (both mtrkmta's and Dovecot's).
MAX_CRYPT_ROUNDS = 1_000_000
MAX_PBKDF2_ITERATIONS = 10_000_000
#: The rounds of a SHA512-CRYPT hash ``mtrkmta passwd --scheme SHA512-CRYPT`` writes.
DEFAULT_CRYPT_ROUNDS = 50_000

# SHA-crypt (Ulrich Drepper, "Unix crypt using SHA-256 and SHA-512", 2008).
_CRYPT_DEFAULT_ROUNDS = 5_000  # when the hash names no rounds
_CRYPT_MIN_ROUNDS = 1_000  # fewer are raised to this, as the specification says
_CRYPT_SALT_MAX = 16
_CRYPT64 = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# Which digest bytes make up each group of four characters (the last group is shorter).
_CRYPT_ORDER = {
    "sha512": (
        (0, 21, 42), (22, 43, 1), (44, 2, 23), (3, 24, 45), (25, 46, 4), (47, 5, 26),
        (6, 27, 48), (28, 49, 7), (50, 8, 29), (9, 30, 51), (31, 52, 10), (53, 11, 32),
        (12, 33, 54), (34, 55, 13), (56, 14, 35), (15, 36, 57), (37, 58, 16), (59, 17, 38),
        (18, 39, 60), (40, 61, 19), (62, 20, 41), (-1, -1, 63),
    ),
    "sha256": (
        (0, 10, 20), (21, 1, 11), (12, 22, 2), (3, 13, 23), (24, 4, 14), (15, 25, 5),
        (6, 16, 26), (27, 7, 17), (18, 28, 8), (9, 19, 29), (-1, 31, 30),
    ),
}  # fmt: skip
_CRYPT_IDS = {SHA512_CRYPT: ("6", "sha512", 86), SHA256_CRYPT: ("5", "sha256", 43)}
_CRYPT_HASH = re.compile(r"\$([56])\$(?:rounds=([0-9]{1,10})\$)?([^$]*)\$([./0-9A-Za-z]+)")

#: Dovecot schemes refused at load: clear text, or hashes too fast or unsalted to keep
#: a stolen file's passwords safe.
CLEARTEXT_SCHEMES = frozenset({"PLAIN", "CLEAR", "CLEARTEXT", "PLAIN-TRUNC"})
WEAK_SCHEMES = frozenset(
    {
        "CRAM-MD5", "HMAC-MD5", "DIGEST-MD5", "MD5", "PLAIN-MD5", "PLAIN-MD4", "LDAP-MD5",
        "SMD5", "MD5-CRYPT", "DES-CRYPT", "SHA", "SHA1", "SSHA", "SHA256", "SHA512",
        "LANMAN", "NTLM", "OTP", "SKEY", "RPA",
    }
)  # fmt: skip
_SCHEME_PREFIX = re.compile(r"\{([A-Za-z0-9._-]+)\}")

# hashlib.pbkdf2_hmac's shape: (hash name, password, salt, iterations) -> derived key.
Derive = Callable[[str, bytes, bytes, int], bytes]


class PasswordFileError(ValueError):
    """The users file has a line that cannot be understood."""


class HashError(ValueError):
    """A stored password hash mtrkmta cannot or will not verify (the message says why)."""


class ChecksBusy(Exception):
    """Too many password checks are already waiting for the checker's threads."""


@dataclass(frozen=True)
class StoredHash:
    """A parsed password hash: what to compute from a password, and what it must equal.

    ``cost`` is the work factor (PBKDF2 iterations, SHA-crypt rounds; 1 for one salted
    digest); ``digest`` is in the form the scheme's computation gives (raw bytes, or the
    crypt-base64 text of SHA-crypt).
    """

    scheme: str
    cost: int
    salt: bytes
    digest: bytes

    def matches(self, password: bytes, derive: Derive = hashlib.pbkdf2_hmac) -> bool:
        """True when ``password`` gives ``digest`` (constant-time comparison)."""
        return hmac.compare_digest(self.digest, self.compute(password, derive))

    def compute(self, password: bytes, derive: Derive = hashlib.pbkdf2_hmac) -> bytes:
        """What ``password`` gives with this salt and cost: one PBKDF2, SHA-crypt or digest."""
        if self.scheme == SCHEME:
            return derive("sha256", password, self.salt, self.cost)
        if self.scheme == DOVECOT_PBKDF2:
            return derive("sha1", password, self.salt, self.cost)
        if self.scheme in _CRYPT_IDS:
            return sha_crypt(_CRYPT_IDS[self.scheme][1], password, self.salt, self.cost)
        name = "sha512" if self.scheme == SSHA512 else "sha256"
        return hashlib.new(name, password + self.salt).digest()

    def text(self) -> str:
        """The stored form, as a users file holds it."""
        b64 = base64.b64encode
        if self.scheme == SCHEME:
            return f"{SCHEME}${self.cost}${b64(self.salt).decode()}${b64(self.digest).decode()}"
        if self.scheme == DOVECOT_PBKDF2:
            salt = self.salt.decode("ascii")
            return f"{{{DOVECOT_PBKDF2}}}$1${salt}${self.cost}${self.digest.hex()}"
        if self.scheme in _CRYPT_IDS:
            ident = _CRYPT_IDS[self.scheme][0]
            rounds = "" if self.cost == _CRYPT_DEFAULT_ROUNDS else f"rounds={self.cost}$"
            salt, digest = self.salt.decode("ascii"), self.digest.decode("ascii")
            return f"{{{self.scheme}}}${ident}${rounds}{salt}${digest}"
        return f"{{{self.scheme}}}{b64(self.digest + self.salt).decode()}"


def sha_crypt(name: str, password: bytes, salt: bytes, rounds: int) -> bytes:
    """The encoded digest of SHA-crypt (``sha512`` for ``$6$``, ``sha256`` for ``$5$``),
    as Ulrich Drepper's specification defines it: the text after the salt's ``$``.

    ``salt`` is cut to 16 bytes and ``rounds`` raised to 1000, as the specification says;
    the caller bounds ``rounds`` (MAX_CRYPT_ROUNDS).
    """
    salt = salt[:_CRYPT_SALT_MAX]
    rounds = max(rounds, _CRYPT_MIN_ROUNDS)
    size = len(password)
    alternate = hashlib.new(name, password + salt + password).digest()  # digest B
    context = hashlib.new(name, password + salt + _repeat(alternate, size))  # digest A
    bit = size
    while bit:
        context.update(alternate if bit & 1 else password)
        bit >>= 1
    digest = context.digest()
    p_bytes = _repeat(hashlib.new(name, password * size).digest(), size)  # sequence P
    s_bytes = _repeat(hashlib.new(name, salt * (16 + digest[0])).digest(), len(salt))  # S
    for index in range(rounds):
        context = hashlib.new(name, p_bytes if index & 1 else digest)
        if index % 3:
            context.update(s_bytes)
        if index % 7:
            context.update(p_bytes)
        context.update(digest if index & 1 else p_bytes)
        digest = context.digest()
    return _crypt64(digest, _CRYPT_ORDER[name])


def _repeat(block: bytes, size: int) -> bytes:
    """``block`` repeated, cut to ``size`` bytes."""
    whole, rest = divmod(size, len(block))
    return block * whole + block[:rest]


def _crypt64(digest: bytes, order: tuple[tuple[int, int, int], ...]) -> bytes:
    """SHA-crypt's base-64 of ``digest``: each three bytes (in ``order``; -1 is a zero
    byte) as four characters, least significant six bits first."""
    out = bytearray()
    for high, middle, low in order:
        value = (digest[high] << 16 if high >= 0 else 0) | (
            digest[middle] << 8 if middle >= 0 else 0
        )
        value |= digest[low]
        count = 4 if high >= 0 else (3 if middle >= 0 else 2)
        for _ in range(count):
            out.append(_CRYPT64[value & 0x3F])
            value >>= 6
    return bytes(out)


def hash_password(
    password: str, *, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None
) -> str:
    """The stored form of ``password``: ``pbkdf2-sha256$ITERATIONS$SALT$HASH`` (base64)."""
    salt = secrets.token_bytes(16) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    return _stored(iterations, salt, digest)


def hash_sha512_crypt(
    password: str, *, rounds: int = DEFAULT_CRYPT_ROUNDS, salt: str | None = None
) -> str:
    """The stored form of ``password`` in Dovecot's ``{SHA512-CRYPT}$6$...`` scheme, with a
    random 16-character salt unless ``salt`` is given (cut to 16 characters)."""
    if salt is None:
        salt = "".join(chr(secrets.choice(_CRYPT64)) for _ in range(_CRYPT_SALT_MAX))
    raw_salt = salt.encode("ascii")[:_CRYPT_SALT_MAX]
    digest = sha_crypt("sha512", password.encode("utf-8"), raw_salt, rounds)
    return StoredHash(SHA512_CRYPT, max(rounds, _CRYPT_MIN_ROUNDS), raw_salt, digest).text()


def make_hash(password: str, scheme: str = SCHEME) -> str:
    """The stored form of ``password`` in ``scheme``, one of WRITABLE_SCHEMES."""
    if scheme == SHA512_CRYPT:
        return hash_sha512_crypt(password)
    if scheme == SCHEME:
        return hash_password(password)
    raise ValueError(f"mtrkmta writes no {scheme!r} hashes (it writes {WRITABLE_SCHEMES})")


def _stored(iterations: int, salt: bytes, digest: bytes) -> str:
    return StoredHash(SCHEME, iterations, salt, digest).text()


def parse_hash(stored: str) -> StoredHash:
    """The hash ``stored`` (mtrkmta's ``pbkdf2-sha256$...`` or Dovecot's ``{SCHEME}...``),
    or HashError saying why it is refused: an unknown, clear-text or weak scheme, a
    malformed hash, or a work factor beyond MAX_CRYPT_ROUNDS / MAX_PBKDF2_ITERATIONS."""
    if stored.startswith(SCHEME + "$"):
        return _parse_pbkdf2_sha256(stored)
    prefix = _SCHEME_PREFIX.match(stored)
    if prefix is None:
        raise HashError(f"expected '{SCHEME}$...' or a Dovecot hash '{{SCHEME}}...'")
    scheme, value = prefix.group(1).upper(), stored[prefix.end() :]
    named = f"{{{prefix.group(1)}}}"
    if scheme == "CRYPT":  # libc crypt(3), which picks the algorithm by the hash's $id$
        if value[:3] in ("$6$", "$5$"):
            scheme = SHA512_CRYPT if value[1] == "6" else SHA256_CRYPT
        elif value.startswith("$1$") or not value.startswith("$"):
            raise HashError(
                f"password scheme {named} (MD5-crypt or DES-crypt) is too weak and refused"
            )
    if scheme in CLEARTEXT_SCHEMES:
        raise HashError(f"password scheme {named} (clear text) is refused")
    if scheme in WEAK_SCHEMES:
        raise HashError(f"password scheme {named} is too weak and refused")
    if scheme in _CRYPT_IDS:
        return _parse_sha_crypt(scheme, value)
    if scheme in (SSHA512, SSHA256):
        return _parse_ssha(scheme, value)
    if scheme == DOVECOT_PBKDF2:
        return _parse_dovecot_pbkdf2(value)
    known = ", ".join(f"{{{name}}}" for name in (*_CRYPT_IDS, SSHA512, SSHA256, DOVECOT_PBKDF2))
    raise HashError(f"password scheme {named} is not supported (mtrkmta knows {known})")


def _parse_pbkdf2_sha256(stored: str) -> StoredHash:
    fields = stored.split("$")
    if len(fields) != 4 or not fields[1].isdigit() or int(fields[1]) < 1:
        raise HashError(f"malformed {SCHEME} hash: expected '{SCHEME}$ITERATIONS$SALT$HASH'")
    iterations = _bounded(SCHEME, "iterations", int(fields[1]), MAX_PBKDF2_ITERATIONS)
    try:
        salt = base64.b64decode(fields[2], validate=True)
        digest = base64.b64decode(fields[3], validate=True)
    except binascii.Error:
        raise HashError(f"malformed {SCHEME} hash: the salt or hash is not base64") from None
    if len(digest) != hashlib.sha256().digest_size:
        raise HashError(f"malformed {SCHEME} hash: the hash is not 32 bytes")
    return StoredHash(SCHEME, iterations, salt, digest)


def _parse_sha_crypt(scheme: str, value: str) -> StoredHash:
    ident, _, length = _CRYPT_IDS[scheme]
    match = _CRYPT_HASH.fullmatch(value)
    if match is None or match.group(1) != ident or len(match.group(4)) != length:
        raise HashError(
            f"malformed {{{scheme}}} hash: expected '${ident}$[rounds=N$]SALT$HASH' "
            f"with a {length}-character hash"
        )
    rounds = _CRYPT_DEFAULT_ROUNDS if match.group(2) is None else int(match.group(2))
    rounds = _bounded(f"{{{scheme}}}", "rounds", rounds, MAX_CRYPT_ROUNDS)
    salt = match.group(3).encode("utf-8")[:_CRYPT_SALT_MAX]
    return StoredHash(scheme, max(rounds, _CRYPT_MIN_ROUNDS), salt, match.group(4).encode())


def _parse_ssha(scheme: str, value: str) -> StoredHash:
    size = hashlib.new("sha512" if scheme == SSHA512 else "sha256").digest_size
    try:
        raw = base64.b64decode(value, validate=True)
    except binascii.Error:
        raise HashError(f"malformed {{{scheme}}} hash: not base64") from None
    if len(raw) <= size:
        raise HashError(f"malformed {{{scheme}}} hash: no salt after the {size}-byte digest")
    return StoredHash(scheme, 1, raw[size:], raw[:size])


def _parse_dovecot_pbkdf2(value: str) -> StoredHash:
    fields = value.split("$")
    malformed = f"malformed {{{DOVECOT_PBKDF2}}} hash: expected '$1$SALT$ROUNDS$HEX'"
    if len(fields) != 5 or fields[0] or fields[1] != "1" or not fields[3].isdigit():
        raise HashError(malformed)
    rounds = _bounded(f"{{{DOVECOT_PBKDF2}}}", "rounds", int(fields[3]), MAX_PBKDF2_ITERATIONS)
    try:
        digest = bytes.fromhex(fields[4])
    except ValueError:
        raise HashError(malformed) from None
    if rounds < 1 or len(digest) != hashlib.sha1().digest_size:
        raise HashError(malformed)
    return StoredHash(DOVECOT_PBKDF2, rounds, fields[2].encode("utf-8"), digest)


def _bounded(scheme: str, what: str, value: int, limit: int) -> int:
    if value > limit:
        raise HashError(f"{scheme} {what}={value} is above mtrkmta's limit of {limit}")
    return value


def verify_password(password: bytes, stored: str, *, derive: Derive = hashlib.pbkdf2_hmac) -> bool:
    """True when ``password`` matches the stored hash (constant-time comparison).

    Runs ``derive`` (PBKDF2) exactly once for a well-formed PBKDF2 ``stored``, and one
    SHA-crypt or salted digest for the other schemes; False for a hash parse_hash refuses.
    """
    try:
        parsed = parse_hash(stored)
    except HashError:
        return False
    return parsed.matches(password, derive)


def usual_cost(stored: Iterable[str]) -> tuple[str, int]:
    """The scheme and work factor most of the ``stored`` hashes use (the highest cost on
    a tie); mtrkmta's own scheme at DEFAULT_ITERATIONS when there is none."""
    counts: Counter[tuple[str, int]] = Counter()
    for value in stored:
        try:
            parsed = parse_hash(value)
        except HashError:
            continue
        counts[parsed.scheme, parsed.cost] += 1
    if not counts:
        return SCHEME, DEFAULT_ITERATIONS
    return max(counts.items(), key=lambda item: (item[1], item[0][1]))[0]


def parse_users(text: str, source: str = "users file") -> dict[str, str]:
    """Parse ``user:hash`` lines; ``#`` starts a comment line; blank lines are ignored.

    Dovecot's passwd-file lines are accepted too: ``user:{SCHEME}hash:uid:gid:...``, the
    fields after the hash ignored. A hash parse_hash refuses is a PasswordFileError
    naming ``source``, the line and why.
    """
    users: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(":")
        if len(fields) < 2 or not fields[0] or not fields[1]:
            raise PasswordFileError(
                f"{source}:{number}: expected 'user:{SCHEME}$...' or 'user:{{SCHEME}}...'"
            )
        try:
            parse_hash(fields[1])
        except HashError as error:
            raise PasswordFileError(
                f"{source}:{number}: {error}; set a new password with 'mtrkmta passwd {fields[0]}'"
            ) from None
        users[fields[0]] = fields[1]
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

    Known and unknown users cost the same, so that timing tells no one which
    users exist: an unknown user is checked against a dummy hash made of random
    bytes drawn once per checker, in the scheme and at the work factor (PBKDF2
    iterations, SHA-crypt rounds) most users of the file have. ``derive`` is the
    PBKDF2 function (tests pass one that counts its calls).
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
        self._dummy_random = secrets.token_bytes(16 + 96)  # salt, digest

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
        """A hash no password matches, in the usual scheme and cost of ``stored``."""
        scheme, cost = usual_cost(stored)
        salt, digest = self._dummy_random[:16], self._dummy_random[16:]
        if scheme in _CRYPT_IDS:  # 16 salt characters, as both mtrkmta and doveadm make
            salt, digest = _crypt_text(salt), _crypt_text(digest)[: _CRYPT_IDS[scheme][2]]
        elif scheme == DOVECOT_PBKDF2:
            salt, digest = _crypt_text(salt), digest[: hashlib.sha1().digest_size]
        elif scheme == SSHA512:
            digest = digest[: hashlib.sha512().digest_size]
        else:
            digest = digest[: hashlib.sha256().digest_size]
        return StoredHash(scheme, cost, salt, digest).text()


def _crypt_text(random: bytes) -> bytes:
    """``random`` as characters of SHA-crypt's alphabet, one per byte."""
    return bytes(_CRYPT64[byte & 0x3F] for byte in random)
