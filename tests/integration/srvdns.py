"""SRV records (RFC 2782) for the loopback DNS server of dnsserver.py, added while it runs.

MTQP servers are found through ``_mtqp._tcp.<host>`` SRV records (RFC 3887 §2). Test
nodes learn their MTQP port only once started, after the DNS server their router
needs is already up, so :func:`publish` adds records to a running server's zone.
"""

from __future__ import annotations

from dnsserver import DNSServer
from twisted.names import dns


def srv(
    priority: int, weight: int, port: int, target: str, ttl: int | None = None
) -> dns.Record_SRV:
    """An SRV record: ``target`` (``"."`` or ``""`` for "no such service") on ``port``."""
    return dns.Record_SRV(priority, weight, port, target.removesuffix(".").encode("ascii"), ttl=ttl)


def mtqp_name(host: str) -> str:
    """The owner name of ``host``'s MTQP SRV records."""
    return f"_mtqp._tcp.{host}"


def publish(server: DNSServer, owner: str, *records: dns.Record_SRV | dns.Record_A) -> None:
    """Add ``records`` under ``owner`` to the zone of the running ``server`` that holds it.

    Records without a TTL get the zone's SOA minimum, as at load time.
    """
    key = owner.lower().removesuffix(".").encode("ascii")
    for authority in server.factory.resolver.resolvers:
        origin, soa = authority.soa
        if key == origin or key.endswith(b"." + origin):
            for record in records:
                if record.ttl is None:
                    record.ttl = soa.minimum
            authority.records.setdefault(key, []).extend(records)
            return
    raise ValueError(f"no zone of the DNS server holds {owner!r}")
