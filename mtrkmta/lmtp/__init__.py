"""LMTP (RFC 2033): the thin variants of the SMTP server and client cores."""
