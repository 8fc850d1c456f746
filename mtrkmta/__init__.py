"""mtrkmta: a mail transfer agent with IETF Message Tracking (RFC 3885-3888)."""

__version__ = "0.1.0"
