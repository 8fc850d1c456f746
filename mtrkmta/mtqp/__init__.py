"""MTQP, the Message Tracking Query Protocol (RFC 3887): commands, responses and the mtqp URI."""
