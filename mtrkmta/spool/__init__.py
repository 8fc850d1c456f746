"""Durable storage of accepted messages: one file per message, fsync'd before any 250."""
