"""Channel names, namespaces and patterns (SPEC §5), with no I/O.

A name is 1..max_length bytes of printable ASCII without space.  ``ns:rest`` puts a
channel in namespace ``ns``; a name that holds ``*``, ``?``, ``[`` or ``\\`` is a
pattern with Redis PSUBSCRIBE glob semantics.  Names in ``wallet:`` are lower-cased.
"""

from __future__ import annotations

__all__ = [
    "PATTERN_CHARS", "OWNER_NAMESPACES", "ChannelError", "is_pattern", "namespace_of",
    "owner_of", "normalize", "validate",
]

PATTERN_CHARS = frozenset("*?[\\")
OWNER_NAMESPACES = ("user", "wallet")
_LOWERCASED = ("wallet:",)


class ChannelError(ValueError):
    """A channel name breaks the rules; the message says which."""


def is_pattern(name: str) -> bool:
    """True if ``name`` holds a glob special character."""
    return any(ch in PATTERN_CHARS for ch in name)


def namespace_of(name: str) -> str:
    """The namespace of a channel, or ``""`` when it has none.

    For a pattern the namespace is known only when the ``:`` comes before any special
    character (``events:*`` is in ``events``; ``*:x`` spans namespaces and gives ``""``).
    """
    colon = name.find(":")
    if colon <= 0:
        return ""
    ns = name[:colon]
    if is_pattern(ns):
        return ""
    return ns


def owner_of(name: str) -> str:
    """The part after ``ns:`` (the owner id of a private channel)."""
    colon = name.find(":")
    return name[colon + 1:] if colon >= 0 else name


def normalize(name: str) -> str:
    """Canonical form: ``wallet:`` names are lower-cased (0x addresses)."""
    for prefix in _LOWERCASED:
        if name.startswith(prefix):
            return name.lower()
    return name


def validate(name: object, max_length: int = 255, *, allow_pattern: bool = True) -> str:
    """Check a channel name and return its canonical form, or raise ChannelError."""
    if not isinstance(name, str):
        raise ChannelError("channel must be a string")
    if not name:
        raise ChannelError("channel must not be empty")
    if not name.isascii():
        raise ChannelError("channel must be printable ASCII")
    if len(name) > max_length:
        raise ChannelError(f"channel longer than {max_length} bytes")
    for ch in name:
        if not "!" <= ch <= "~":
            raise ChannelError("channel must be printable ASCII without space")
    if not allow_pattern and is_pattern(name):
        raise ChannelError("channel must not be a pattern (no * ? [ \\)")
    return normalize(name)
