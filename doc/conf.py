"""Sphinx configuration for the mtrkmta documentation."""

project = "mtrkmta"
author = "the mtrkmta developers"
copyright = "2026, the mtrkmta developers"
extensions: list[str] = []
exclude_patterns = ["_build"]
html_theme = "alabaster"
nitpicky = False

# `sphinx-build -b man doc build/man` (the docs tox env builds them too); doc/running.rst,
# "Manual pages", says how to install them. tests/unit/test_man_pages.py keeps the option
# lists of doc/man/ equal to the commands' own.
man_pages = [
    ("man/mtrkmta", "mtrkmta", "mail transfer agent with IETF Message Tracking", [author], 8),
    ("configuration", "mtrkmta.toml", "mtrkmta configuration file", [author], 5),
    ("man/mtrkmta-queue", "mtrkmta-queue", "list and act on the mtrkmta mail queue", [author], 8),
    ("man/mtrkmta-send", "mtrkmta-send", "submit a message with tracking (MTRK)", [author], 1),
    ("man/mtrkmta-track", "mtrkmta-track", "ask where a message is, hop by hop", [author], 1),
    ("man/sendmail", "sendmail", "mtrkmta's sendmail, mailq and newaliases", [author], 1),
]
man_show_urls = False
