"""Channel names, namespaces, patterns and owners (SPEC §5), with no I/O.

A name is 1..max_length bytes of printable ASCII without space.  ``ns:rest`` puts a
channel in namespace ``ns``; a name that holds ``*``, ``?``, ``[`` or ``\\`` is a
pattern with Redis PSUBSCRIBE glob semantics (:func:`is_pattern` is the compiled
matcher's, ``fastws._match``, where glob matching lives).  Names in ``wallet:`` are
lower-cased.  The channels of the owner namespaces (``user:``, ``wallet:``) belong to
the token ``sub`` after the ``:``; 0x addresses are the same owner in any letter case
(:func:`same_owner`, :func:`owner_key`).
"""

from __future__ import annotations

import re

from fastws._match import is_pattern

__all__ = [
    "PATTERN_CHARS", "OWNER_NAMESPACES", "ChannelError", "is_address", "is_pattern",
    "namespace_of", "owner_key", "owner_of", "normalize", "same_owner", "validate",
]

#: the glob special characters (what :func:`is_pattern` looks for)
PATTERN_CHARS = frozenset("*?[\\")
#: namespaces whose channels are private to their owner (``subscribe = "owner"``)
OWNER_NAMESPACES = ("user", "wallet")
_LOWERCASED = ("wallet:",)
_ADDRESS_RE = re.compile(r"^0x[0-9a-fA-F]{40}$")


class ChannelError(ValueError):
    """A channel name breaks the rules; the message says which."""


def is_address(text: str) -> bool:
    """True for a 0x-prefixed 20-byte hex address (any letter case)."""
    return bool(_ADDRESS_RE.match(text))


def owner_key(user: str) -> str:
    """The canonical form of an owner id: 0x addresses lower-cased, others as they are.

    Two ids are the same owner exactly when their keys are equal (:func:`same_owner`).
    """
    return user.lower() if is_address(user) else user


def same_owner(owner: str, user: str) -> bool:
    """True if ``user`` owns a private channel whose name ends in ``owner``.

    Exact equality, or, for 0x addresses, equality ignoring letter case (EIP-55
    checksums are only a letter-case encoding of the same 20 bytes).
    """
    if owner == user:
        return True
    return is_address(owner) and is_address(user) and owner.lower() == user.lower()


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
