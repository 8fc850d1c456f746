"""LocalAddresses: what a recipient address means here: aliases and lists applied, with defaults."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mtrkmta.routing.aliases import AliasBook, Resolution

EMPTY_ALIASES = AliasBook({}, {})


class LocalAddresses:
    """Resolves recipient addresses against the current aliases file (``book``: the
    book in force now, re-read on change) and the local domains."""

    def __init__(
        self,
        *,
        local_domains: Sequence[str],
        delimiter: str,
        book: Callable[[], AliasBook] = lambda: EMPTY_ALIASES,
    ) -> None:
        self.local_domains = tuple(local_domains)
        self.delimiter = delimiter
        self._book = book

    def resolve(self, address: str) -> Resolution:
        """Aliases and lists applied to ``address``; ``<postmaster>`` (no domain) is the
        postmaster of the primary local domain, the first of ``domains.local``
        (RFC 5321 §4.5.1)."""
        return self._book().resolve(
            address,
            local_domains=self.local_domains,
            delimiter=self.delimiter,
            default_domain=self.local_domains[0] if self.local_domains else "",
        )
