"""The mtqp URI of RFC 3887 §9: ``mtqp://host[:port]/track/<unique-envid>/<mtrk-secret>``."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from mtrkmta.mtqp.protocol import (
    DEFAULT_PORT,
    CommandError,
    SecretError,
    Track,
    decode_envid,
    decode_secret,
)

SCHEME = "mtqp"
_PREFIX = SCHEME + "://"
_TRACK = "/track/"
_REG_NAME = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
_PORT = re.compile(r"[0-9]{1,5}")
# Left as they are when formatting: RFC 3986 pchar less pct-encoded.
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@")
_HEX = frozenset("0123456789ABCDEFabcdef")


class UriError(ValueError):
    """Not an mtqp URI, or one whose envid, secret, host or port is malformed."""


@dataclass(frozen=True, slots=True)
class MtqpUri:
    """An mtqp URI (RFC 3887 §9).

    ``host`` is a domain name, IPv4 address or IPv6 address (without brackets);
    ``envid`` is the unique-envid as written in TRACK, i.e. xtext (``+XX``
    escapes kept); ``secret`` the base64 mtrk-secret, hidden from ``repr``.
    """

    host: str
    envid: str
    secret: str = field(repr=False)
    port: int = DEFAULT_PORT

    def __post_init__(self) -> None:
        _check_host(self.host)
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise UriError(f"port must be an int, not {self.port!r}")
        if not 1 <= self.port <= 65535:
            raise UriError(f"port out of range: {self.port}")
        if not self.envid or any(not "!" <= char <= "~" for char in self.envid):
            raise UriError("unique-envid must be printable ASCII without spaces")
        try:
            decode_envid(self.envid)
        except CommandError as exc:
            raise UriError(str(exc)) from None
        try:
            decode_secret(self.secret)
        except SecretError as exc:
            raise UriError(str(exc)) from None

    def __str__(self) -> str:
        return format_uri(self)

    def track(self) -> Track:
        """The TRACK command this URI stands for."""
        return Track(decode_envid(self.envid), self.secret)


def format_uri(uri: MtqpUri) -> str:
    """The URI text: the port only when not 1038, IPv6 in brackets, values %XX-escaped.

    Besides ``/``, ``?`` and ``%`` (3887 §9.4), every character that RFC 3986 does
    not allow in a path segment is escaped, so generic URI tools read it right.
    """
    host = f"[{uri.host}]" if ":" in uri.host else uri.host
    port = "" if uri.port == DEFAULT_PORT else f":{uri.port}"
    return f"{_PREFIX}{host}{port}{_TRACK}{_escape(uri.envid)}/{_escape(uri.secret)}"


def parse_uri(text: str) -> MtqpUri:
    """Read an mtqp URI (RFC 3887 §9).

    The scheme and ``/track/`` are case-insensitive, the two values are not;
    ``%XX`` escapes are decoded in both. An empty port means 1038. User info,
    a query (a raw ``?``) or a path other than ``/track/<envid>/<secret>``
    raise :class:`UriError`.
    """
    if text[: len(_PREFIX)].lower() != _PREFIX:
        raise UriError("not an mtqp:// URI")
    rest = text[len(_PREFIX) :]
    slash = rest.find("/")
    if slash < 0:
        raise UriError("mtqp URI without /track/ path")
    authority, path = rest[:slash], rest[slash:]
    host, port = _authority(authority)
    if path[: len(_TRACK)].lower() != _TRACK:
        raise UriError("mtqp URI path does not start with /track/")
    if "?" in path:
        raise UriError("mtqp URI with a query; '?' must be written %3F")
    segments = path[len(_TRACK) :].split("/")
    if len(segments) != 2 or not all(segments):
        raise UriError("mtqp URI path must be /track/<unique-envid>/<mtrk-secret>")
    envid, secret = (_unescape(segment) for segment in segments)
    return MtqpUri(host=host, envid=envid, secret=secret, port=port)


def _authority(authority: str) -> tuple[str, int]:
    if "@" in authority:
        raise UriError("mtqp URI with user information")
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            raise UriError("unterminated IPv6 literal")
        host, after = authority[1:close], authority[close + 1 :]
        if ":" not in host:
            raise UriError("bracketed host is not an IPv6 address")
        if after and not after.startswith(":"):
            raise UriError("junk after the IPv6 literal")
        port_text = after[1:] if after else ""
    else:
        host, _colon, port_text = authority.partition(":")
    if port_text and not _PORT.fullmatch(port_text):
        raise UriError(f"bad port {port_text!r}")
    return host, int(port_text) if port_text else DEFAULT_PORT


def _check_host(host: str) -> None:
    if not isinstance(host, str) or not host:
        raise UriError("mtqp URI without a host")
    if ":" in host:
        if "%" in host:
            raise UriError("IPv6 zone identifiers are not supported")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise UriError(f"bad IPv6 address {host!r}") from None
    elif not _REG_NAME.fullmatch(host):
        raise UriError(f"bad host name {host!r}")


def _escape(value: str) -> str:
    return "".join(
        char if char in _SAFE else "".join(f"%{octet:02X}" for octet in char.encode("utf-8"))
        for char in value
    )


def _unescape(segment: str) -> str:
    octets = bytearray()
    index = 0
    while index < len(segment):
        char = segment[index]
        if char == "%":
            pair = segment[index + 1 : index + 3]
            if len(pair) != 2 or not set(pair) <= _HEX:
                raise UriError("'%' not followed by two hex digits")
            octets.append(int(pair, 16))
            index += 3
            continue
        if not "!" <= char <= "~":
            raise UriError(f"character {char!r} must be %-encoded")
        octets.append(ord(char))
        index += 1
    try:
        return octets.decode("ascii")
    except UnicodeDecodeError:
        raise UriError("unique-envid and mtrk-secret are ASCII") from None
