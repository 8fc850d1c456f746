"""Routes: the ``[routes]`` table, its parsing, and which route a domain takes."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from twisted.internet.endpoints import clientFromString

from mtrkmta.config.convert import (
    PARSE_ONLY,
    TLS_POLICIES,
    Transport,
    _choice,
    _Context,
    _domain_name,
    _got,
    _Invalid,
    _optional_file,
    _string,
)


@dataclass(frozen=True, slots=True)
class RelayCredentials:
    """A route's AUTH credentials toward its next hop, read from ``path`` at load.

    The password never shows in ``repr`` (nor anywhere else but the AUTH exchange).
    """

    path: Path
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class CAFile:
    """The certificates a ``tls = verify`` route trusts instead of the system's, read at load."""

    path: Path
    pem: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Route:
    """Where mail for ``domain`` goes: a domain, ``.domain`` for its subdomains, or ``*``.

    ``endpoint`` is a Twisted client endpoint description for ``lmtp`` and ``smtp``
    (a fixed next hop), and None for ``maildir`` and ``mx`` (MX lookup). ``tls`` is
    the STARTTLS policy toward the next hop (none, may, encrypt, verify); None means
    ``delivery.tls``. ``ca`` is what ``verify`` trusts (None: the system's CAs);
    ``auth`` the credentials for AUTH toward the next hop (only with encrypt or verify).
    """

    domain: str
    transport: Transport
    endpoint: str | None = None
    tls: str | None = None
    ca: CAFile | None = None
    auth: RelayCredentials | None = None


DEFAULT_ROUTE = Route("*", "mx")

_ROUTE_TARGETS = "maildir, mx, lmtp:ENDPOINT or smtp:ENDPOINT"


_ROUTE_OPTIONS = ("tls", "ca_file", "auth")
_OPTION_SUFFIX = re.compile(r";(tls|ca_file|auth)=")


def _route(domain: object, target: object, ctx: _Context | None = None) -> Route:
    """Check one ``DOMAIN = TARGET`` pair; TARGET may be a table ``{ target = ..., tls = ...,
    ca_file = ..., auth = ... }``, or a string ending in ``;tls=POLICY;ca_file=PATH;auth=PATH``.
    """
    ctx = ctx if ctx is not None else _Context(Path("."))
    options: dict[str, object] = {}
    if isinstance(target, Mapping):
        if "target" not in target:
            raise _Invalid(
                f"expected {_ROUTE_TARGETS} or {{ target = ..., tls = ... }}, got a table "
                f"without 'target'; quote domain names that contain dots, "
                f'as in "example.org" = "mx"'
            )
        unknown = sorted(set(target) - {"target", *_ROUTE_OPTIONS})
        if unknown:
            raise _Invalid(
                f"a route table takes 'target', 'tls', 'ca_file' and 'auth', "
                f"not {', '.join(map(repr, unknown))}"
            )
        options = {key: target[key] for key in _ROUTE_OPTIONS if key in target}
        target = target["target"]
    elif isinstance(target, str) and _OPTION_SUFFIX.search(target):
        parts = _OPTION_SUFFIX.split(target)
        target = parts[0]
        for key, value in zip(parts[1::2], parts[2::2], strict=True):
            options[key] = value
    route = _route_target(domain, target)
    return _with_options(route, options, ctx) if options else route


def _with_options(route: Route, options: Mapping[str, object], ctx: _Context) -> Route:
    """``route`` with its tls, ca_file and auth options, checked against each other."""
    tls = _choice(*TLS_POLICIES)(options["tls"], ctx) if "tls" in options else None
    ca = _ca_file(options["ca_file"], ctx) if "ca_file" in options else None
    auth = _credentials(options["auth"], ctx) if "auth" in options else None
    if ca is not None and tls != "verify":
        raise _Invalid('ca_file needs tls = "verify" on the same route')
    if auth is not None:
        if route.transport not in ("smtp", "mx"):
            raise _Invalid(f"auth is for smtp and mx routes, not {route.transport}")
        if tls not in ("encrypt", "verify"):
            raise _Invalid(
                'auth needs tls = "encrypt" or "verify" on the same route '
                "(credentials are never sent in clear)"
            )
    return dataclasses.replace(route, tls=tls, ca=ca, auth=auth)


def _ca_file(value: object, ctx: _Context) -> CAFile:
    """A PEM file of one or more CA certificates."""
    path = _optional_file(value, ctx)
    if path is None:
        raise _Invalid("expected the path of a PEM file of CA certificates, got an empty string")
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise _Invalid(f"cannot read {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise _Invalid(f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return CAFile(path, pem)


def _credentials(value: object, ctx: _Context) -> RelayCredentials:
    """A file only the server may read, holding one ``USERNAME:PASSWORD`` line.

    Blank lines and ``#`` comments are ignored; the password is everything after the
    first colon, up to the end of the line.
    """
    path = _optional_file(value, ctx)
    if path is None:
        raise _Invalid("expected the path of a credentials file, got an empty string")
    try:
        mode = path.stat().st_mode
        if mode & 0o077:
            raise _Invalid(
                f"{path} is readable by group or others (mode {mode & 0o777:o}); "
                f"run chmod 600 {path}"
            )
        text = path.read_text("utf-8")
    except OSError as exc:
        raise _Invalid(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise _Invalid(f"{path} is not UTF-8 text") from None
    lines = [
        line.rstrip("\r")
        for line in text.split("\n")
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if len(lines) != 1:
        raise _Invalid(f"{path} must hold exactly one USERNAME:PASSWORD line, found {len(lines)}")
    username, colon, password = lines[0].strip().partition(":")
    if not colon or not username or not password or "\0" in lines[0]:
        raise _Invalid(f"{path}: expected one line USERNAME:PASSWORD (both non-empty)")
    return RelayCredentials(path, username, password)


def _route_target(domain: object, target: object) -> Route:
    if domain == "*":
        name = "*"
    elif isinstance(domain, str) and domain.startswith("."):
        try:
            name = "." + _domain_name(domain[1:])
        except _Invalid:
            raise _Invalid(f"expected .DOMAIN such as .example.org, got {domain!r}") from None
    else:
        name = _domain_name(domain)
    if isinstance(target, Mapping):
        raise _Invalid(
            f"expected {_ROUTE_TARGETS}, got a table; quote domain names that contain dots, "
            f'as in "example.org" = "mx"'
        )
    text = _string(target, _ROUTE_TARGETS)
    transport, colon, endpoint = text.partition(":")
    transport = transport.lower()
    if transport in ("maildir", "mx") and not colon:
        return Route(name, cast(Transport, transport))
    if transport in ("lmtp", "smtp") and endpoint:
        try:
            clientFromString(PARSE_ONLY, endpoint)
        except Exception as exc:  # Twisted's parsers raise anything from ValueError to TypeError.
            raise _Invalid(
                f"expected a client endpoint description such as tcp:host=127.0.0.1:port=2526 "
                f"or unix:path=/run/dovecot/lmtp after {transport}:, got {endpoint!r} ({exc})"
            ) from None
        return Route(name, cast(Transport, transport), endpoint)
    raise _Invalid(f"expected {_ROUTE_TARGETS}, got {text!r}")


def _routes(value: object, ctx: _Context) -> tuple[Route, ...]:
    """The ``[routes]`` table: ``"domain" = "target"`` pairs."""
    if not isinstance(value, Mapping):
        raise _Invalid(f"expected a table of domain = target, got {_got(value)}")
    routes = []
    for domain, target in value.items():
        try:
            routes.append(_route(domain, target, ctx))
        except _Invalid as exc:
            raise _Invalid(exc.problem, "." + _toml_key(domain)) from None
    return tuple(routes)


def _route_option(value: object, ctx: _Context) -> tuple[Route, ...]:
    """One ``--route DOMAIN=TARGET``, split at the first ``=``."""
    text = _string(value, "DOMAIN=TARGET")
    domain, equals, target = text.partition("=")
    if not equals:
        raise _Invalid(f"expected DOMAIN=TARGET such as example.org=mx, got {text!r}")
    try:
        return (_route(domain.strip(), target.strip(), ctx),)
    except _Invalid as exc:
        raise _Invalid(f"{text!r}: {exc.problem}") from None


def _merge_routes(*layers: tuple[Route, ...]) -> tuple[Route, ...]:
    """Later layers replace earlier routes of the same domain; ``*`` goes last, mx if absent."""
    by_domain: dict[str, Route] = {}
    for layer in layers:
        for route in layer:
            by_domain[route.domain] = route
    default = by_domain.pop("*", DEFAULT_ROUTE)
    return (*by_domain.values(), default)


def _toml_key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else '"' + name + '"'


def select_route(routes: Sequence[Route], local_domains: Collection[str], domain: str) -> Route:
    """The route for ``domain``.

    In order: its own route; maildir if it is local; the route of the nearest
    ``.parent`` pattern it falls under; the ``*`` route (``mx`` when there is none).
    """
    name = domain.lower().removesuffix(".")
    by_domain = {route.domain: route for route in routes}
    if name in by_domain:
        return by_domain[name]
    if name in local_domains:
        return Route(name, "maildir")
    labels = name.split(".")
    for start in range(1, len(labels)):
        parent = "." + ".".join(labels[start:])
        if parent in by_domain:
            return by_domain[parent]
    return by_domain.get("*", DEFAULT_ROUTE)
