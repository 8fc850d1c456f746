"""Delivery transports (SMTP relay, LMTP, Maildir): each turns an attempt into outcomes."""
