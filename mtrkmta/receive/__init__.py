"""The receive path's policy and acceptance behind the SMTP, submission and LMTP listeners."""
