"""RCPT checks beyond relaying: local users that exist, and recipients not known to fail."""

from __future__ import annotations

from collections.abc import Callable, Collection

from mtrkmta.address import base_local_part, recipient_domain, split_address
from mtrkmta.delivery.interfaces import NextHop, RouteFailure
from mtrkmta.receive.policy import route_refusal
from mtrkmta.routing.aliases import Deliver, Loop
from mtrkmta.routing.local import LocalAddresses
from mtrkmta.smtp.reply import Reply


class RecipientChecks:
    """The ``check_local`` and ``check_route`` of the ``Receiver``.

    ``known_route`` is the router's decision for a domain as far as it is known
    without asking DNS (``Router.known``); ``mailbox_problem`` says why a local
    address can have no Maildir (``MaildirTransport.unusable``), or None.
    """

    def __init__(
        self,
        *,
        addresses: LocalAddresses,
        users: Collection[str],
        known_route: Callable[[str], NextHop | RouteFailure | None],
        mailbox_problem: Callable[[str], str | None],
    ) -> None:
        self.addresses = addresses
        self.users = frozenset(users)
        self.known_route = known_route
        self.mailbox_problem = mailbox_problem

    def check_local(self, address: str) -> Reply | None:
        """550 5.1.1 for a local address that is no user, alias or list (local.users)."""
        local_part, domain = split_address(address)
        if domain and domain.lower() not in self.addresses.local_domains:
            return None
        if not isinstance(self.addresses.resolve(address), Deliver):
            return None  # an alias or a list
        base = base_local_part(local_part, self.addresses.delimiter).lower()
        if base in self.users or base == "postmaster":
            return None
        return Reply(550, "5.1.1", (f"<{address}>: Recipient address rejected: User unknown",))

    def check_route(self, address: str) -> Reply | None:
        """Refuse at RCPT a recipient the queue would fail for a reason known now: an
        alias loop (5.4.6), what the router already knows (no domain, a bad address
        literal, a cached null MX or NXDOMAIN), a local part that can have no mailbox.
        Accepting it would mean a bounce to a sender who may be forged.
        """
        resolution = self.addresses.resolve(address)
        if isinstance(resolution, Loop):
            text = (
                f"<{address}>: Recipient address rejected: mail loop: the alias expands into itself"
            )
            return Reply(550, "5.4.6", (text,))
        if not isinstance(resolution, Deliver):
            return None  # an alias or a list: its targets are the administrator's
        final = resolution.address
        route = self.known_route(recipient_domain(final))
        refusal = route_refusal(address, route)
        if refusal is None and isinstance(route, NextHop) and route.transport == "maildir":
            problem = self.mailbox_problem(final)
            if problem is not None:
                text = f"<{address}>: Recipient address rejected: {problem}"
                refusal = Reply(553, "5.1.3", (text,))
        return refusal

    def check_binary(self, address: str) -> Reply | None:
        """550 5.6.3 unless the recipient is delivered into a Maildir here, the one path
        known to take a ``BODY=BINARYMIME`` message (RFC 3030 §3): a next hop (an LMTP
        server such as Dovecot, an SMTP relay) may not offer BINARYMIME, and the message
        would then fail 5.6.3 after acceptance (``binarymime_status``)."""
        resolution = self.addresses.resolve(address)
        if isinstance(resolution, Deliver):
            route = self.known_route(recipient_domain(resolution.address))
            if isinstance(route, NextHop) and route.transport == "maildir":
                return None
        text = (
            f"<{address}>: Recipient address rejected: binary MIME (BODY=BINARYMIME) cannot "
            "be delivered to this recipient; send the message as 8BITMIME"
        )
        return Reply(550, "5.6.3", (text,))
