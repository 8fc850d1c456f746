"""Routes: the ``[routes]`` table, its parsing, and which route a domain takes."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from twisted.internet.endpoints import clientFromString
from twisted.internet.testing import MemoryReactor

from mtrkmta.config.convert import (
    TLS_POLICIES,
    Transport,
    _choice,
    _Context,
    _domain_name,
    _got,
    _Invalid,
    _string,
)


@dataclass(frozen=True, slots=True)
class Route:
    """Where mail for ``domain`` goes: a domain, ``.domain`` for its subdomains, or ``*``.

    ``endpoint`` is a Twisted client endpoint description for ``lmtp`` and ``smtp``
    (a fixed next hop), and None for ``maildir`` and ``mx`` (MX lookup). ``tls`` is
    the STARTTLS policy toward the next hop (none, may, encrypt); None means
    ``delivery.tls``.
    """

    domain: str
    transport: Transport
    endpoint: str | None = None
    tls: str | None = None


DEFAULT_ROUTE = Route("*", "mx")

_ROUTE_TARGETS = "maildir, mx, lmtp:ENDPOINT or smtp:ENDPOINT"


def _route(domain: object, target: object) -> Route:
    """Check one ``DOMAIN = TARGET`` pair; TARGET may be ``{ target = ..., tls = ... }``.

    As a string, TARGET may end in ``;tls=POLICY``.
    """
    tls: str | None = None
    if isinstance(target, Mapping):
        if "target" not in target:
            raise _Invalid(
                f"expected {_ROUTE_TARGETS} or {{ target = ..., tls = ... }}, got a table "
                f"without 'target'; quote domain names that contain dots, "
                f'as in "example.org" = "mx"'
            )
        unknown = sorted(set(target) - {"target", "tls"})
        if unknown:
            raise _Invalid(
                f"a route table takes 'target' and 'tls', not {', '.join(map(repr, unknown))}"
            )
        if "tls" in target:
            tls = _choice(*TLS_POLICIES)(target["tls"], _Context(Path(".")))
        target = target["target"]
    elif isinstance(target, str) and ";tls=" in target:
        target, _, policy = target.rpartition(";tls=")
        tls = _choice(*TLS_POLICIES)(policy, _Context(Path(".")))
    route = _route_target(domain, target)
    return dataclasses.replace(route, tls=tls) if tls is not None else route


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
            clientFromString(MemoryReactor(), endpoint)
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
            routes.append(_route(domain, target))
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
        return (_route(domain.strip(), target.strip()),)
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
