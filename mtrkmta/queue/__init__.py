"""The queue: scheduling, retries, expiry, crash recovery and the admin control channel."""
