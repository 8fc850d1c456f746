"""Sans-IO SMTP/LMTP protocol toolkit: replies, command parsing, ESMTP parameters."""
