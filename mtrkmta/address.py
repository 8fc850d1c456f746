"""Mail addresses as routing and delivery read them: local part, domain, base before +detail."""

from __future__ import annotations


def split_address(address: str) -> tuple[str, str]:
    """``(local part, domain)``, split at the last ``@``; ``(address, "")`` without one."""
    local, at, domain = address.rpartition("@")
    return (local, domain) if at else (address, "")


def base_local_part(local: str, delimiter: str) -> str:
    """The local part without its ``+detail`` (``delimiter``; ``""`` for none).

    A local part whose base before the delimiter would be empty (``+detail``) is
    not split: it names a mailbox of its own, never an empty one.
    """
    if delimiter:
        base, found, _ = local.partition(delimiter)
        if found and base:
            return base
    return local


def recipient_domain(address: str) -> str:
    """The lower-cased domain of an address; ``""`` for a bare local part (``postmaster``)."""
    at = address.rfind("@")
    return address[at + 1 :].lower().rstrip(".") if at >= 0 else ""
