"""The HTTP service on twisted.web: the site root, health, admin and the other parts."""
