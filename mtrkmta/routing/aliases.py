"""Aliases and mailing lists: the TOML aliases file and how a local recipient expands."""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mtrkmta.address import base_local_part, split_address

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


log = Logger()


class AliasError(ValueError):
    """The aliases file is wrong; the message names the file, the entry and the problem."""


@dataclass(frozen=True, slots=True)
class Alias:
    """``[alias.NAME]``: mail for NAME@<local domain> goes to ``targets``.

    ``primary`` (multi-target only) is the one target that receives the MTRK
    certifier (RFC 3885 §3.3). ``confidential`` hides the targets and stops
    tracking here (RFC 3886 §4.2; RFC 3464 §4.2); ``final`` marks a role alias whose
    delivery counts as final (RFC 3885 §4.2).
    """

    name: str
    targets: tuple[str, ...]
    primary: str | None = None
    confidential: bool = False
    final: bool = False


@dataclass(frozen=True, slots=True)
class MailingList:
    """``[list.NAME]``: a list exploder; copies go out from ``owner`` (RFC 3461 §5.2.7.1)."""

    name: str
    members: tuple[str, ...]
    owner: str


@dataclass(frozen=True, slots=True)
class Deliver:
    """No (more) expansion: route ``address`` (a single-target alias may have rewritten it)."""

    address: str


@dataclass(frozen=True, slots=True)
class Expand:
    """A multi-target alias: the recipient is ``expanded`` into ``targets``."""

    alias: Alias
    targets: tuple[str, ...]
    primary: str | None


@dataclass(frozen=True, slots=True)
class Redistribute:
    """A mailing list: the recipient is ``expanded``; members get a new message."""

    mailing_list: MailingList
    members: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Divert:
    """A confidential or role alias: tracking stops (``delivered``); untracked copies go on."""

    alias: Alias
    targets: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Loop:
    """The alias expands (directly or not) into itself: the recipient fails with 5.4.6."""

    address: str


Resolution = Deliver | Expand | Redistribute | Divert | Loop

_ALIAS_KEYS = {"to", "primary", "confidential", "final"}
_LIST_KEYS = {"members", "owner"}


def _address(value: object, where: str) -> str:
    if not isinstance(value, str) or not value.strip() or any(c in value for c in " \t<>,\r\n"):
        raise AliasError(f"{where}: expected an address or local part, got {value!r}")
    return value.strip()


def _addresses(value: object, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise AliasError(f"{where}: expected a non-empty list of addresses, got {value!r}")
    return tuple(_address(v, where) for v in value)


def _flag(table: Mapping[str, Any], key: str, where: str) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise AliasError(f"{where}.{key}: expected true or false, got {value!r}")
    return value


def _suggest(extra: set[str], allowed: Iterable[str], where: str) -> None:
    """Raise AliasError with "did you mean" for a key close to an allowed one."""
    for key in sorted(extra):
        close = difflib.get_close_matches(key, sorted(allowed), n=1)
        if close:
            raise AliasError(f"{where}.{key}: unknown key; did you mean {close[0]}?")


class AliasBook:
    """The parsed aliases file: aliases and lists by lower-cased local part."""

    def __init__(self, aliases: Mapping[str, Alias], lists: Mapping[str, MailingList]) -> None:
        clash = set(aliases) & set(lists)
        if clash:
            raise AliasError(f"both an alias and a list are named {', '.join(sorted(clash))}")
        self.aliases = dict(aliases)
        self.lists = dict(lists)

    @classmethod
    def parse(cls, text: str, source: str = "aliases file") -> AliasBook:
        """Parse the TOML aliases file (see doc/local.rst for the format)."""
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise AliasError(f"{source}: {error}") from None
        unknown = set(document) - {"alias", "list"}
        if unknown:
            raise AliasError(
                f"{source}: unknown table(s) {', '.join(sorted(unknown))}; "
                "expected [alias.NAME] and [list.NAME]"
            )
        aliases = {}
        for name, table in document.get("alias", {}).items():
            where = f"{source}: alias.{name}"
            if not isinstance(table, dict):
                raise AliasError(f"{where}: expected a table")
            extra = set(table) - _ALIAS_KEYS
            _suggest(extra, _ALIAS_KEYS, where)
            if extra or "to" not in table:
                raise AliasError(
                    f"{where}: expected keys to, primary, confidential, final; "
                    f"got {', '.join(sorted(table))}"
                )
            targets = _addresses(table["to"], f"{where}.to")
            primary = table.get("primary")
            if primary is not None:
                primary = _address(primary, f"{where}.primary")
                if primary not in targets:
                    raise AliasError(f"{where}.primary: {primary!r} is not one of the targets")
            aliases[name.lower()] = Alias(
                name.lower(),
                targets,
                primary,
                _flag(table, "confidential", where),
                _flag(table, "final", where),
            )
        lists = {}
        for name, table in document.get("list", {}).items():
            where = f"{source}: list.{name}"
            if not isinstance(table, dict):
                raise AliasError(f"{where}: expected a table")
            extra = set(table) - _LIST_KEYS
            _suggest(extra, _LIST_KEYS, where)
            if extra or "members" not in table or "owner" not in table:
                raise AliasError(
                    f"{where}: expected keys members and owner; got {', '.join(sorted(table))}"
                )
            lists[name.lower()] = MailingList(
                name.lower(),
                _addresses(table["members"], f"{where}.members"),
                _address(table["owner"], f"{where}.owner"),
            )
        return cls(aliases, lists)

    def resolve(
        self,
        address: str,
        *,
        local_domains: Collection[str],
        delimiter: str = "+",
        default_domain: str = "",
    ) -> Resolution:
        """What happens to mail for ``address`` (RFC 3885 §3.3, §4.2; RFC 3461 §5.2.7;
        RFC 3886 §4.2).

        Single-target aliases are followed (each rewrites the address); the first
        multi-target alias, list, confidential or role alias ends the walk. An
        alias that leads back to itself is a Loop. An address without a domain
        (``<postmaster>``, RFC 5321 §4.5.1) is taken to be in ``default_domain``
        (the primary local domain), and so are the bare targets of its aliases.
        """
        seen: set[str] = set()
        current = address
        if default_domain and not split_address(address)[1]:
            current = f"{address}@{default_domain}"
        while True:
            entry, domain = self._entry(current, local_domains, delimiter)
            if entry is None:
                return Deliver(current)
            if entry.name in seen or self._cycles(entry, domain, local_domains, delimiter):
                return Loop(address)
            seen.add(entry.name)
            if isinstance(entry, MailingList):
                return Redistribute(entry, self._qualify(entry.members, domain))
            targets = self._qualify(entry.targets, domain)
            if entry.confidential or entry.final:
                return Divert(entry, targets)
            if len(targets) > 1:
                primary = self._qualify((entry.primary,), domain)[0] if entry.primary else None
                return Expand(entry, targets, primary)
            current = targets[0]

    def _entry(
        self, address: str, local_domains: Collection[str], delimiter: str
    ) -> tuple[Alias | MailingList | None, str]:
        local, domain = split_address(address)
        domain = domain.lower()
        if domain and domain not in local_domains:
            return None, domain
        name = base_local_part(local, delimiter).lower()
        return self.aliases.get(name) or self.lists.get(name), domain

    @staticmethod
    def _qualify(targets: tuple[str, ...], domain: str) -> tuple[str, ...]:
        """Bare local parts get the domain of the address being expanded."""
        return tuple(t if "@" in t or not domain else f"{t}@{domain}" for t in targets)

    def _cycles(
        self,
        start: Alias | MailingList,
        domain: str,
        local_domains: Collection[str],
        delimiter: str,
    ) -> bool:
        """Whether expanding ``start`` can ever come back to ``start``."""
        stack = [(start, domain)]
        visited: set[str] = set()
        while stack:
            entry, entry_domain = stack.pop()
            targets = entry.members if isinstance(entry, MailingList) else entry.targets
            for target in self._qualify(targets, entry_domain):
                found, found_domain = self._entry(target, local_domains, delimiter)
                if found is None:
                    continue
                if found.name == start.name:
                    return True
                if found.name not in visited:
                    visited.add(found.name)
                    stack.append((found, found_domain))
        return False


class AliasSource:
    """The aliases file as the queue sees it: re-read when it changes (or on demand).

    Reading and parsing run in the thread pool; a file that no longer parses is
    reported in the log and the previous aliases stay in force.
    """

    def __init__(self, path: Path, reactor: Any, threadpool: ThreadPool) -> None:
        self.path = path
        self._reactor = reactor
        self._threadpool = threadpool
        self.book = AliasBook({}, {})
        self._stamp: tuple[int, int] | None = None

    def load(self) -> AliasBook:
        """Blocking first read; an error here is a start-up error."""
        self.book = AliasBook.parse(self.path.read_text("utf-8"), str(self.path))
        self._stamp = self._stat()
        return self.book

    def refresh(self, force: bool = False) -> Deferred[None]:
        """Re-read the file if it changed since the last read (or always, with ``force``)."""

        def check() -> AliasBook | None:
            stamp = self._stat()
            if not force and stamp == self._stamp:
                return None
            book = AliasBook.parse(self.path.read_text("utf-8"), str(self.path))
            self._stamp = stamp
            return book

        def loaded(book: AliasBook | None) -> None:
            if book is not None:
                self.book = book
                log.info(
                    "aliases reloaded from {path}: {a} alias(es), {l} list(s)",
                    path=self.path,
                    a=len(book.aliases),
                    l=len(book.lists),
                )

        def failed(failure: Failure) -> None:
            log.error(
                "aliases file not reloaded, the previous aliases stay: {error}",
                error=failure.getErrorMessage(),
            )

        d = deferToThreadPool(self._reactor, self._threadpool, check)
        return d.addCallbacks(loaded, failed)

    def replace(self, path: Path, book: AliasBook) -> None:
        """Use ``book``, read from ``path``, from now on (a reload read and checked it)."""
        self.path = path
        self.book = book
        try:
            self._stamp = self._stat()
        except OSError:
            self._stamp = None

    def _stat(self) -> tuple[int, int]:
        st = os.stat(self.path)
        return (st.st_mtime_ns, st.st_size)
