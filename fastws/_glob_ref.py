"""Pure-Python reference of Redis glob matching, for tests only.

A line-by-line port of ``stringmatchlen_impl`` from Redis 7.0.15 (src/util.c)
with ``nocase=0``, recursion and ``skipLongerMatches`` included, so that the
non-recursive C version in ``_match.pyx`` can be checked against the original
algorithm.  The server never imports this module.

Redis works on NUL-terminated sds strings and sometimes reads one byte past the
pattern's length; ``_at`` returns that NUL.  Redis compares range bounds as
``char``, which is signed on x86-64, so bytes >= 0x80 sort below ASCII there.
"""

from __future__ import annotations

__all__ = ["glob_match", "stringmatchlen"]


def _signed(b: int) -> int:
    """The byte as a signed C char."""
    return b - 256 if b >= 128 else b


def _at(pat: bytes, i: int) -> int:
    """pat[i], or the NUL terminator past the end."""
    return pat[i] if i < len(pat) else 0


def _impl(pat: bytes, p: int, s: bytes, i: int, skip: list[bool]) -> bool:
    """stringmatchlen_impl(pat + p, len - p, s + i, len - i, 0, &skip[0])."""
    plen = len(pat) - p  # patternLen
    slen = len(s) - i    # stringLen
    while plen and slen:
        c = pat[p]
        if c == 0x2A:  # '*'
            while plen and _at(pat, p + 1) == 0x2A:
                p += 1
                plen -= 1
            if plen == 1:
                return True
            while slen:
                if _impl(pat, p + 1, s, i, skip):
                    return True
                if skip[0]:
                    return False
                i += 1
                slen -= 1
            skip[0] = True
            return False
        elif c == 0x3F:  # '?'
            i += 1
            slen -= 1
        elif c == 0x5B:  # '['
            p += 1
            plen -= 1
            negate = _at(pat, p) == 0x5E  # '^'
            if negate:
                p += 1
                plen -= 1
            match = False
            while True:
                if _at(pat, p) == 0x5C and plen >= 2:  # '\\'
                    p += 1
                    plen -= 1
                    if pat[p] == s[i]:
                        match = True
                elif _at(pat, p) == 0x5D:  # ']'
                    break
                elif plen == 0:
                    p -= 1
                    plen += 1
                    break
                elif plen >= 3 and pat[p + 1] == 0x2D:  # '-'
                    start, end, ch = _signed(pat[p]), _signed(pat[p + 2]), _signed(s[i])
                    if start > end:
                        start, end = end, start
                    p += 2
                    plen -= 2
                    if start <= ch <= end:
                        match = True
                elif pat[p] == s[i]:
                    match = True
                p += 1
                plen -= 1
            if negate:
                match = not match
            if not match:
                return False
            i += 1
            slen -= 1
        else:
            if c == 0x5C and plen >= 2:  # '\\' escapes the next byte
                p += 1
                plen -= 1
            if pat[p] != s[i]:
                return False
            i += 1
            slen -= 1
        p += 1
        plen -= 1
        if slen == 0:
            while _at(pat, p) == 0x2A:
                p += 1
                plen -= 1
            break
    return plen == 0 and slen == 0


def stringmatchlen(pattern: bytes, string: bytes) -> bool:
    """Redis ``stringmatchlen(pattern, len, string, len, 0)``."""
    return _impl(pattern, 0, string, 0, [False])


def glob_match(pattern: str | bytes, channel: str | bytes) -> bool:
    """True if ``channel`` matches the Redis glob ``pattern`` (str is UTF-8 encoded)."""
    if isinstance(pattern, str):
        pattern = pattern.encode("utf-8")
    if isinstance(channel, str):
        channel = channel.encode("utf-8")
    return stringmatchlen(bytes(pattern), bytes(channel))
