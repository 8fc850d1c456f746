"""RFC 3461 §4 xtext: encode and decode octet strings carried in ESMTP parameter values."""

from __future__ import annotations

import re

# xchar: "!" (33) to "~" (126) except "+" (43) and "=" (61); hexchar: "+" and two hex digits.
_STRICT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*")
_LENIENT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-Fa-f]{2})*")
_HEXCHAR = re.compile(r"\+([0-9A-Fa-f]{2})")


class XtextError(ValueError):
    """A value that is not valid xtext, or a character that xtext cannot carry."""


def decode(value: str, *, lenient: bool = False) -> str:
    """Decode xtext into octets, one str character (U+0000..U+00FF) per octet.

    Rejects a raw ``=``, any character outside 33..126 and a ``+`` not followed by
    two upper-case hex digits (RFC 3461 §4, doc/conformance.rst 3461-P4); ``lenient`` also
    accepts lower-case hex digits.
    """
    pattern = _LENIENT if lenient else _STRICT
    if pattern.fullmatch(value) is None:
        raise XtextError(f"invalid xtext: {value[:60]!r}")
    return _HEXCHAR.sub(lambda m: chr(int(m.group(1), 16)), value)


def encode(value: str) -> str:
    """Encode octets (str characters U+0000..U+00FF) as xtext.

    ``+``, ``=`` and every character outside 33..126 become ``+XX`` with upper-case
    hex (RFC 3461 §4); a character above U+00FF raises :class:`XtextError`.
    """
    out: list[str] = []
    for char in value:
        point = ord(char)
        if point > 0xFF:
            raise XtextError(f"character {char!r} is not an octet")
        if 33 <= point <= 126 and char not in "+=":
            out.append(char)
        else:
            out.append(f"+{point:02X}")
    return "".join(out)


def noncanonical(received: str, decoded: str) -> str | None:
    """``received`` when it is valid xtext but not :func:`encode` of ``decoded``, else None.

    ``ab+41cd`` is kept; ``abAcd`` is not, since encoding the decoded value gives it
    back. What a relay keeps to send the same esmtp-value on (RFC 3461 §5.2.1(a) and
    (d)). Lower-case hex (``a+2bb``, accepted only when lenient) is not xtext (RFC
    3461 §4) and a strict next hop would refuse it: it goes on encoded canonically.
    """
    if encode(decoded) == received or _STRICT.fullmatch(received) is None:
        return None
    return received


def on_the_wire(decoded: str, received: str | None) -> str:
    """The xtext to send for ``decoded``: ``received`` as it came, else encoded canonically."""
    return encode(decoded) if received is None else received
