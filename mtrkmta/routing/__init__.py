"""Routing: which transport and servers mail for a domain goes to (routes, local domains, MX)."""
