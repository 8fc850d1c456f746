"""Delivery Status Notifications: when to send them and how they look (RFC 3461, 3464, 6522)."""
