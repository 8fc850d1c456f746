"""MTA-STS (RFC 8461) without I/O: the TXT record, the policy file, MX matching, the cache."""

from __future__ import annotations

import dataclasses
import json
import re
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from twisted.internet.interfaces import IReactorTime
from zope.interface import Attribute, Interface

from mtrkmta.config import CAFile
from mtrkmta.delivery.interfaces import NextHop, RouteFailure
from mtrkmta.tracking.interfaces import RecipientState

MAX_POLICY_SIZE = 64 * 1024
"""The largest policy body read (RFC 8461 §3.3: a sender SHOULD bound the size; 64 KiB)."""

MAX_AGE_LIMIT = 31_557_600
"""The longest ``max_age`` honoured, in seconds (RFC 8461 §3.2: at most 31557600)."""

Mode = Literal["enforce", "testing", "none"]
MODES: tuple[Mode, ...] = ("enforce", "testing", "none")

# RFC 8461 §3.1: sts-id = 1*32(ALPHA / DIGIT); fields are separated by *WSP ";" *WSP.
_TXT_START = re.compile(r"^v=STSv1[ \t]*;")
_TXT_FIELD = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,31})=([\x21-\x3a\x3c\x3e-\x7e]+)$")
_STS_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
# RFC 8461 §3.2: sts-policy-field-name = (ALPHA / DIGIT) *31(ALPHA / DIGIT / "_" / "-" / ".").
_FIELD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_MAX_AGE = re.compile(r"^[0-9]{1,10}$")
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_MX_PATTERN = re.compile(rf"^(?:\*\.)?{_LABEL}(?:\.{_LABEL})+$")


class PolicyError(ValueError):
    """A TXT record or a policy file that is not valid MTA-STS: the text says what is wrong."""


def txt_id(records: Sequence[str]) -> str | None:
    """The policy id from the TXT records of ``_mta-sts.<domain>`` (RFC 8461 §3.1), or None.

    Records not starting with ``v=STSv1;`` are discarded; none left means the domain
    announces no policy (None). More than one left, or one that is not valid, raises
    PolicyError (the domain has no usable policy: §3.1 says to skip discovery).
    """
    announcing = [record for record in records if _TXT_START.match(record)]
    if not announcing:
        return None
    if len(announcing) > 1:
        raise PolicyError(f"{len(announcing)} TXT records start with v=STSv1; exactly one may")
    record = announcing[0]
    fields = [part.strip(" \t") for part in record.split(";")[1:]]
    if fields and fields[-1] == "":
        fields.pop()  # a trailing delimiter is allowed
    found: str | None = None
    for text in fields:
        match = _TXT_FIELD.match(text)
        if match is None:
            raise PolicyError(f"TXT record field {text[:40]!r} is not name=value")
        name, value = match.groups()
        if name == "id" and found is None:
            if not _STS_ID.match(value):
                raise PolicyError(f"TXT record id {value[:40]!r} is not 1 to 32 letters or digits")
            found = value
    if found is None:
        raise PolicyError("TXT record v=STSv1 has no id")
    return found


@dataclass(frozen=True, slots=True)
class Policy:
    """A parsed policy (RFC 8461 §3.2): ``mx`` patterns lower case, without a trailing dot."""

    mode: Mode
    max_age: int
    mx: tuple[str, ...]

    def allows(self, host: str) -> bool:
        """Whether MX host ``host`` matches one of the policy's ``mx`` patterns (§4.1)."""
        return any(mx_matches(pattern, host) for pattern in self.mx)


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1: ``host`` equals ``pattern``, or ``pattern`` is ``*.rest`` and ``host``
    is one more label (not empty, not two) in front of ``rest``. Case does not matter."""
    pattern = pattern.lower().removesuffix(".")
    host = host.lower().removesuffix(".")
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return host == pattern


def parse_policy(body: bytes) -> Policy:
    """The policy in ``body`` (RFC 8461 §3.2), or PolicyError saying why it is not one.

    Lines end in LF or CRLF; each is ``name: value``. Unknown fields are ignored; of a
    field other than ``mx`` only the first occurrence counts. ``version`` must be
    ``STSv1``; ``mode`` enforce, testing or none; ``max_age`` 1 to 10 digits, capped at
    31557600; ``mx`` at least once unless the mode is none.
    """
    if len(body) > MAX_POLICY_SIZE:
        raise PolicyError(f"policy larger than {MAX_POLICY_SIZE} bytes")
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise PolicyError("policy is not ASCII text") from None
    fields: dict[str, str] = {}
    patterns: list[str] = []
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # a final line ending
    for number, raw in enumerate(lines, 1):
        line = raw.removesuffix("\r")
        name, colon, value = line.partition(":")
        if not colon or not _FIELD_NAME.match(name):
            raise PolicyError(f"policy line {number} is not 'name: value'")
        value = value.strip(" \t")
        if any(ord(char) < 0x20 or char == "\x7f" for char in value):
            raise PolicyError(f"policy line {number} has a control character")
        if name == "mx":
            patterns.append(value)
        else:
            fields.setdefault(name, value)
    version = fields.get("version")
    if version != "STSv1":
        raise PolicyError(f"policy version is {version!r}, not 'STSv1'")
    mode = fields.get("mode")
    if mode not in MODES:
        raise PolicyError(f"policy mode is {mode!r}, not enforce, testing or none")
    max_age = fields.get("max_age")
    if max_age is None or not _MAX_AGE.match(max_age):
        raise PolicyError(f"policy max_age is {max_age!r}, not 1 to 10 digits")
    mx: list[str] = []
    for pattern in patterns:
        normal = pattern.lower().removesuffix(".")
        if not _MX_PATTERN.match(normal) or len(normal) > 253:
            raise PolicyError(f"policy mx {pattern[:80]!r} is not a host name or *.domain")
        mx.append(normal)
    if mode != "none" and not mx:
        raise PolicyError(f"policy mode {mode} has no mx")
    return Policy(mode, min(int(max_age), MAX_AGE_LIMIT), tuple(mx))


@dataclass(frozen=True, slots=True)
class Cached:
    """A policy as cached: the TXT id it was fetched for and when it expires (POSIX seconds)."""

    policy: Policy
    id: str
    expires: float


class PolicyCache:
    """Policies by domain (RFC 8461 §5.1), each until its ``max_age`` ends, for at most
    ``size`` domains: the least recently used is dropped first."""

    def __init__(self, clock: IReactorTime, size: int) -> None:
        if size < 1:
            raise ValueError(f"the MTA-STS cache needs room for at least 1 domain, got {size}")
        self._clock = clock
        self._size = size
        self._entries: OrderedDict[str, Cached] = OrderedDict()

    def get(self, domain: str) -> Cached | None:
        """The unexpired policy of ``domain``, if one is cached."""
        entry = self._entries.get(domain)
        if entry is None:
            return None
        if self._clock.seconds() >= entry.expires:
            del self._entries[domain]
            return None
        self._entries.move_to_end(domain)
        return entry

    def put(self, domain: str, policy_id: str, policy: Policy) -> Cached:
        entry = Cached(policy, policy_id, self._clock.seconds() + policy.max_age)
        self._entries[domain] = entry
        self._entries.move_to_end(domain)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return entry

    def restore(self, domain: str, entry: Cached) -> None:
        """Take back ``entry`` (read from the cache file) unless something newer is cached."""
        if domain not in self._entries and entry.expires > self._clock.seconds():
            self._entries[domain] = entry
            self._entries.move_to_end(domain, last=False)  # older than anything fetched since
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)

    def items(self) -> Iterator[tuple[str, Cached]]:
        """The unexpired entries, least recently used first."""
        now = self._clock.seconds()
        return iter([(d, e) for d, e in self._entries.items() if e.expires > now])

    def __len__(self) -> int:
        return len(self._entries)


CACHE_FORMAT = "mtrkmta-mta-sts-1"


def dump_cache(entries: Sequence[tuple[str, Cached]]) -> bytes:
    """The cache file's content: JSON, each domain's id, expiry (POSIX seconds) and policy."""
    return json.dumps(
        {
            "format": CACHE_FORMAT,
            "policies": [
                {
                    "domain": domain,
                    "id": entry.id,
                    "expires": entry.expires,
                    "mode": entry.policy.mode,
                    "max_age": entry.policy.max_age,
                    "mx": list(entry.policy.mx),
                }
                for domain, entry in entries
            ],
        },
        indent=1,
    ).encode("ascii")


def load_cache(data: bytes) -> list[tuple[str, Cached]]:
    """The entries of a cache file, each checked as a fetched policy is; PolicyError if the
    file is not one (an entry that is not valid is a broken file: nothing is trusted)."""
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise PolicyError("not JSON") from None
    if not isinstance(document, dict) or document.get("format") != CACHE_FORMAT:
        raise PolicyError(f"not an {CACHE_FORMAT} document")
    items = document.get("policies")
    if not isinstance(items, list):
        raise PolicyError("'policies' is not a list")
    entries = []
    for item in items:
        try:
            domain, policy_id, expires = item["domain"], item["id"], float(item["expires"])
            lines = ["version: STSv1", f"mode: {item['mode']}", f"max_age: {item['max_age']}"]
            lines += [f"mx: {pattern}" for pattern in item["mx"]]
        except (KeyError, TypeError, ValueError):
            raise PolicyError("an entry lacks domain, id, expires, mode, max_age or mx") from None
        if not isinstance(domain, str) or not isinstance(policy_id, str):
            raise PolicyError("an entry's domain or id is not text")
        if any("\n" in line or "\r" in line for line in lines):
            raise PolicyError("an entry's value holds a line break")
        if not _STS_ID.match(policy_id):
            raise PolicyError(f"entry id {policy_id[:40]!r} is not 1 to 32 letters or digits")
        policy = parse_policy("\n".join(lines).encode("ascii", "replace"))
        entries.append((domain.lower(), Cached(policy, policy_id, expires)))
    return entries


Step = Literal["use-cached", "fetch", "none"]


def next_step(announced: str | None, cached: Cached | None) -> Step:
    """What to do with a domain's TXT id (None: no valid record) and its cached policy (§5.1).

    A cached policy with the announced id is used as it is; another (or no) cached one
    means fetching anew; without a TXT record an unexpired cached policy still holds
    (§5.1; dropping it would let whoever strips the record downgrade delivery, §10.2).
    """
    if announced is None:
        return "use-cached" if cached is not None else "none"
    if cached is not None and cached.id == announced:
        return "use-cached"
    return "fetch"


@dataclass(frozen=True, slots=True)
class Applied:
    """The next hop after the policy, and a line to log (testing mode, or a refusal)."""

    result: NextHop | RouteFailure
    note: str | None = None


def apply_policy(
    domain: str, result: NextHop | RouteFailure, policy: Policy | None, ca: CAFile | None
) -> Applied:
    """The MX next hop ``result`` of ``domain`` under ``policy`` (RFC 8461 §5).

    ``enforce``: MX hosts no ``mx`` pattern matches are dropped, and TLS to the rest is
    required and verified against the MX host name (``tls = verify``, trusting ``ca`` or
    else the system's CAs, §4.2); with no host left, the recipients are deferred 4.7.0.
    ``testing``: the hop stays as it is; MX hosts outside the policy are noted for the log.
    ``none`` or no policy: unchanged.
    """
    if policy is None or policy.mode == "none" or not isinstance(result, NextHop):
        return Applied(result)
    outside = sorted({s.name for s in result.servers if not policy.allows(s.name)})
    allowed = _listed(policy.mx)
    if policy.mode == "testing":
        if not outside:
            return Applied(result)
        note = (
            f"MTA-STS policy of {domain} (mode testing) does not allow MX "
            f"{_listed(outside)} (it allows {allowed}); delivering as without a policy"
        )
        return Applied(result, note)
    servers = tuple(s for s in result.servers if policy.allows(s.name))
    if not servers:
        reason = (
            f"no MX host of {domain} is in its MTA-STS policy (MX {_listed(outside)}; "
            f"the policy allows {allowed})"
        )
        return Applied(RouteFailure(RecipientState.DEFERRED, "4.7.0", reason), reason)
    hop = dataclasses.replace(result, servers=servers, tls="verify", ca=ca)
    if outside:
        return Applied(hop, f"MTA-STS policy of {domain} excludes MX {_listed(outside)}")
    return Applied(hop)


SHOWN_NAMES = 5
"""How many MX names or patterns a log line or diagnostic lists (a policy may hold many)."""


def _listed(names: Sequence[str]) -> str:
    """``names`` comma-separated, the first SHOWN_NAMES of them and how many more."""
    shown = ", ".join(names[:SHOWN_NAMES])
    more = len(names) - SHOWN_NAMES
    return f"{shown} and {more} more" if more > 0 else shown


class IPolicySource(Interface):
    """Where the router gets a domain's MTA-STS policy (discovery, fetch and cache)."""

    ca = Attribute("CAFile | None: what TLS to an MX under an enforce policy trusts")

    def policy(domain: str) -> object:
        """A Deferred firing with the domain's Policy, or None when it has none; never fails."""
