"""Tracking store: what the MTA knows about each accepted message (RFC 3885 §3.1)."""
