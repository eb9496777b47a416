"""What a token's ``channels`` claim grants, and which namespaces a glob pattern reaches.

:func:`granted` says whether a claim allows a channel or a pattern subscription;
:func:`may_match_prefix` whether a pattern that spans namespaces can reach one.
Matching itself is the compiled Redis glob of :mod:`fastws._match`; the pattern
characters are those of :mod:`fastws.channels`.
"""

from __future__ import annotations

from collections.abc import Iterable

from fastws import channels
from fastws._match import glob_match

__all__ = ["granted", "may_match_prefix"]


def _literal_prefix(pattern: str) -> str:
    for i, ch in enumerate(pattern):
        if ch in channels.PATTERN_CHARS:
            return pattern[:i]
    return pattern


def granted(grants: Iterable[str], name: str) -> bool:
    """True if a ``channels`` claim allows the channel or pattern ``name``.

    A channel is allowed when one of the claim's patterns matches it (Redis glob).
    A pattern subscription is allowed only when every channel it can match is
    allowed, which is decided conservatively: the claim lists the same pattern, or
    a ``PREFIX*`` entry (a literal prefix then one ``*``) whose prefix starts the
    pattern's own literal prefix (``market:*`` allows ``market:0xab*``).
    """
    if not channels.is_pattern(name):
        return any(g == name or glob_match(g, name) for g in grants)
    prefix = _literal_prefix(name)
    for g in grants:
        if g == name:
            return True
        if g.endswith("*") and not channels.is_pattern(g[:-1]) and prefix.startswith(g[:-1]):
            return True
    return False


def _glob_tokens(pattern: str) -> list[str | None]:
    """A pattern as tokens: a literal character, ``"*"`` for a star, or None for one
    byte of any value (``?``, and any ``[...]`` class, over-approximated)."""
    out: list[str | None] = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "*":
            out.append("*")
        elif ch == "?":
            out.append(None)
        elif ch == "[":
            j = pattern.find("]", i + 2)
            out.append(None)
            if j < 0:
                return out + ["*"]      # an unterminated class: assume anything follows
            i = j
        elif ch == "\\" and i + 1 < n:
            i += 1
            out.append("\\" + pattern[i])
        else:
            out.append(ch)
        i += 1
    return out


def may_match_prefix(pattern: str, prefix: str) -> bool:
    """True if some channel starting with ``prefix`` might match the glob ``pattern``.

    Over-approximates (character classes count as any byte), so a False is certain:
    used to find the namespaces a pattern that spans namespaces can reach.
    """
    toks = _glob_tokens(pattern)
    n = len(toks)

    def close(states: set[int]) -> set[int]:
        out = set(states)
        stack = list(states)
        while stack:
            i = stack.pop()
            if i < n and toks[i] == "*" and i + 1 not in out:
                out.add(i + 1)
                stack.append(i + 1)
        return out

    states = close({0})
    for ch in prefix:
        nxt: set[int] = set()
        for i in states:
            if i >= n:
                continue
            t = toks[i]
            if t == "*":
                nxt.add(i)
            elif t is None or t == ch or (len(t) == 2 and t[1] == ch):
                nxt.add(i + 1)
        if not nxt:
            return False
        states = close(nxt)
    return bool(states)

