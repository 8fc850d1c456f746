"""Sphinx configuration for the mtrkmta documentation."""

project = "mtrkmta"
author = "the mtrkmta developers"
copyright = "2026, the mtrkmta developers"
extensions: list[str] = []
exclude_patterns = ["_build"]
html_theme = "alabaster"
nitpicky = False
