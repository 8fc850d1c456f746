"""A Config written back as TOML, one ``section.key = value`` line per setting."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from mtrkmta.config.convert import _Context, _format_duration, _format_size, _Invalid
from mtrkmta.config.load import _Key, _schema
from mtrkmta.config.routes import CAFile, Route, _toml_key
from mtrkmta.config.schema import Config
from mtrkmta.config.webhooks import EVENT_KINDS, Webhook


def value_of(config: Config, name: str) -> Any:
    """The value of setting ``name`` (``section.key``, or ``routes``) in ``config``."""
    key = _by_name()[name]
    value: Any = config
    for attr in key.attr:
        value = getattr(value, attr)
    return value


def render(config: Config, names: Sequence[str]) -> list[str]:
    """The lines of the settings ``names`` (in the order given) with their values in
    ``config``: TOML that loads back into the same values."""
    keys = _by_name()
    lines: list[str] = []
    for name in names:
        value = value_of(config, name)
        if name == "routes":
            lines += [f"routes.{_toml_key(route.domain)} = {_route(route)}" for route in value]
        elif name == "webhooks":
            lines += [f"webhooks.{hook.name} = {_webhook(hook)}" for hook in value]
            lines += [] if value else ["webhooks = {}"]
        else:
            lines.append(f"{name} = {_toml(keys[name], value)}")
    return lines


def differing(config: Config, default: Config) -> list[str]:
    """The settings whose value in ``config`` is not the one in ``default``, in order."""
    return [name for name in _by_name() if value_of(config, name) != value_of(default, name)]


def _by_name() -> dict[str, _Key]:
    return {key.dotted: key for key in _schema()}


def _route(route: Route) -> str:
    target = route.transport if route.endpoint is None else f"{route.transport}:{route.endpoint}"
    target += "" if route.tls is None else f";tls={route.tls}"
    target += "" if route.ca is None else f";ca_file={route.ca.path}"
    target += "" if route.auth is None else f";auth={route.auth.path}"  # the file, never its secret
    return _string(target)


def _webhook(hook: Webhook) -> str:
    """A ``[webhooks.NAME]`` table inline (the secret itself stays in its file)."""
    shown = []
    for item in fields(hook):
        value = getattr(hook, item.name)
        if item.name == "name" or value is None:
            continue
        if item.name == "events":
            value = tuple(kind for kind in EVENT_KINDS if kind in value)
        if isinstance(value, tuple):
            text = "[" + ", ".join(_string(entry) for entry in value) + "]"
        elif isinstance(value, float):
            text = _string(_format_duration(value))
        elif isinstance(value, int):
            text = str(value)
        else:
            text = _string(str(value))
        shown.append(f"{item.name} = {text}")
    return "{ " + ", ".join(shown) + " }"


def _string(text: str) -> str:
    """A TOML basic string: JSON's escapes are all TOML escapes, and TOML also wants
    DEL escaped."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml(key: _Key, value: object) -> str:
    """``value`` written the way the file would say it: ``"35M"`` rather than 36700160
    and ``"5m"`` rather than 300.0 when the key takes them back as the same value."""
    if value is None:
        none = "none" if _takes(key, "none", None) else ""
        return _string(none)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        return _string(str(value))
    if isinstance(value, CAFile):  # the file, as the configuration names it
        return _string(str(value.path))
    if isinstance(value, tuple):
        return "[" + ", ".join(_string(str(item)) for item in value) + "]"
    if isinstance(value, int):
        pretty = _format_size(value)
        if pretty != str(value) and _takes(key, pretty, value):
            return _string(pretty)
        return str(value)
    if isinstance(value, float):
        pretty = _format_duration(value)
        if _takes(key, pretty, value):
            return _string(pretty)
        return repr(value)
    return _string(str(value))


def _takes(key: _Key, raw: object, value: object) -> bool:
    """Whether ``key`` reads ``raw`` as ``value``."""
    try:
        return bool(key.convert(raw, _Context(Path("/"))) == value)
    except _Invalid:
        return False
