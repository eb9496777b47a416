# cython: language_level=3
"""Compiled channel matcher: Redis glob matching and the subscription trie.

``c_glob_match`` is a byte-exact, non-recursive port of ``stringmatchlen`` from
Redis 7.0.15 (src/util.c, ``nocase=0``), the function behind ``PSUBSCRIBE``.
It touches no Python object and can run without the GIL.

``Trie`` maps subscription names (exact channels and glob patterns) to the set of
keys (connections) registered under them and answers "who receives a publication
on this channel?":

* exact channels live in a dict (one lookup);
* patterns hang off a byte trie keyed by their *literal prefix* (the bytes before
  the first ``* ? [ \\``).  A pattern can only match channels that start with its
  literal prefix, so ``match`` walks the channel's bytes down the trie and
  glob-tests only the patterns met on the way;
* results are cached per channel and invalidated on every change that can alter
  them.

The pure-Python reference in ``_glob_ref.py`` is for tests only.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

__all__ = ["Trie", "glob_match", "is_pattern"]

cdef enum:
    STAR = 42       # '*'
    QMARK = 63      # '?'
    LBRACKET = 91   # '['
    BACKSLASH = 92  # '\\'
    RBRACKET = 93   # ']'
    CARET = 94      # '^'
    DASH = 45       # '-'

# Invalidation of the cache after a pattern change: below this many cached
# channels, drop only those the pattern matches; above, clear the whole cache.
cdef enum:
    SELECTIVE_INVALIDATE_MAX = 512


# --------------------------------------------------------------------------- glob

cdef inline unsigned char _at(const unsigned char* pat, Py_ssize_t plen,
                              Py_ssize_t i) noexcept nogil:
    """pat[i], or 0 past the end (Redis reads the sds NUL terminator there)."""
    return pat[i] if i < plen else 0


cdef bint c_glob_match(const unsigned char* pat, Py_ssize_t plen,
                       const unsigned char* s, Py_ssize_t slen) noexcept nogil:
    """Redis 7.0.15 ``stringmatchlen(pat, plen, s, slen, 0)``, without recursion.

    Redis recurses at every ``*`` and, once a ``*`` has tried every remaining
    position of the string in vain, sets ``skipLongerMatches`` so every enclosing
    ``*`` gives up too.  Hence only the most recent ``*`` is ever retried, which
    is the classic single-backtrack-point loop below: same answers, O(plen*slen)
    time, constant stack.  Odd patterns (unterminated ``[``, ``[^``, trailing
    ``\\``, ``[z-a]``, ranges over bytes >= 0x80 compared as *signed* char as on
    x86-64) behave exactly as in Redis.
    """
    cdef Py_ssize_t p = 0, i = 0
    cdef Py_ssize_t star_p = -1, star_i = 0
    cdef unsigned char c
    cdef bint failed, negate, hit
    cdef int lo, hi, ch, t
    while True:
        failed = False
        while p < plen and i < slen:
            c = pat[p]
            if c == STAR:
                while _at(pat, plen, p + 1) == STAR:
                    p += 1
                if plen - p == 1:
                    return True
                # Redis: try the rest of the pattern at every position from here.
                p += 1
                star_p = p
                star_i = i
                continue
            elif c == QMARK:
                i += 1
            elif c == LBRACKET:
                p += 1
                negate = _at(pat, plen, p) == CARET
                if negate:
                    p += 1
                hit = False
                while True:
                    if _at(pat, plen, p) == BACKSLASH and plen - p >= 2:
                        p += 1
                        if pat[p] == s[i]:
                            hit = True
                    elif _at(pat, plen, p) == RBRACKET:
                        break
                    elif p == plen:
                        p -= 1
                        break
                    elif plen - p >= 3 and pat[p + 1] == DASH:
                        lo = <signed char>pat[p]
                        hi = <signed char>pat[p + 2]
                        ch = <signed char>s[i]
                        if lo > hi:
                            t = lo
                            lo = hi
                            hi = t
                        p += 2
                        if lo <= ch <= hi:
                            hit = True
                    elif pat[p] == s[i]:
                        hit = True
                    p += 1
                if negate:
                    hit = not hit
                if not hit:
                    failed = True
                    break
                i += 1
            else:
                if c == BACKSLASH and plen - p >= 2:
                    p += 1
                if pat[p] != s[i]:
                    failed = True
                    break
                i += 1
            p += 1
            if i == slen:
                while _at(pat, plen, p) == STAR:
                    p += 1
                break
        if not failed and p == plen and i == slen:
            return True
        # Mismatch: retry the most recent '*' one byte further, if any is left.
        if star_p < 0:
            return False
        star_i += 1
        if star_i >= slen:
            return False
        p = star_p
        i = star_i


cdef inline bytes _as_bytes(object value):
    """UTF-8 bytes of a str, or the bytes object itself."""
    if type(value) is bytes:
        return <bytes>value
    if isinstance(value, str):
        return (<str>value).encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"expected str or bytes, not {type(value).__name__}")


def glob_match(pattern, channel) -> bool:
    """True if ``channel`` matches the Redis glob ``pattern`` (str is UTF-8 encoded)."""
    cdef bytes p = _as_bytes(pattern)
    cdef bytes s = _as_bytes(channel)
    return c_glob_match(<const unsigned char*>PyBytes_AS_STRING(p), PyBytes_GET_SIZE(p),
                        <const unsigned char*>PyBytes_AS_STRING(s), PyBytes_GET_SIZE(s))


cdef inline bint _is_pattern(str name):
    return "*" in name or "?" in name or "[" in name or "\\" in name


def is_pattern(str name) -> bool:
    """True if ``name`` is a glob pattern (holds ``*``, ``?``, ``[`` or ``\\``)."""
    return _is_pattern(name)


cdef Py_ssize_t _literal_prefix_len(bytes raw):
    """Bytes before the first ``* ? [ \\`` (UTF-8 never puts these inside a code point)."""
    cdef const unsigned char* b = <const unsigned char*>PyBytes_AS_STRING(raw)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(raw), j
    for j in range(n):
        if b[j] == STAR or b[j] == QMARK or b[j] == LBRACKET or b[j] == BACKSLASH:
            return j
    return n


# --------------------------------------------------------------------------- trie

@cython.final
cdef class _Pattern:
    """One glob pattern: its UTF-8 bytes and its keys (dict used as ordered set)."""

    cdef bytes raw
    cdef dict keys

    def __cinit__(self, bytes raw):
        self.raw = raw
        self.keys = {}


@cython.final
cdef class _Node:
    """Trie node: children by next byte, patterns whose literal prefix ends here."""

    cdef dict children   # int (byte) -> _Node
    cdef dict patterns   # str -> _Pattern, insertion ordered

    def __cinit__(self):
        self.children = {}
        self.patterns = {}

    cdef Py_ssize_t count(self):
        cdef Py_ssize_t n = 1
        cdef _Node child
        for child in self.children.values():
            n += child.count()
        return n


cdef _Node _find(Trie trie, bytes raw):
    """The node of ``trie`` at the literal prefix of pattern bytes ``raw``, or None."""
    cdef _Node node = <_Node>trie._root
    cdef Py_ssize_t j, n = _literal_prefix_len(raw)
    cdef const unsigned char* b = <const unsigned char*>PyBytes_AS_STRING(raw)
    if node is None:
        return None
    for j in range(n):
        node = node.children.get(b[j])
        if node is None:
            return None
    return node


cdef int _invalidate_pattern(Trie trie, bytes raw) except -1:
    """Drop cached results of ``trie`` that a change of pattern ``raw`` may have made stale."""
    cdef str channel
    cdef bytes s
    cdef list stale
    if len(trie._cache) > SELECTIVE_INVALIDATE_MAX:
        trie._cache.clear()
        return 0
    stale = []
    for channel in trie._cache:
        s = channel.encode("utf-8")
        if c_glob_match(<const unsigned char*>PyBytes_AS_STRING(raw),
                        PyBytes_GET_SIZE(raw),
                        <const unsigned char*>PyBytes_AS_STRING(s),
                        PyBytes_GET_SIZE(s)):
            stale.append(channel)
    for channel in stale:
        del trie._cache[channel]
    return 0


cdef class Trie:
    """Subscription registry: exact channels and glob patterns -> keys.

    Create one per hub; call ``add``/``remove`` on (un)subscribe and ``match``
    for every publication.  Keys are any hashable objects (connections).
    """

    def __init__(self, Py_ssize_t cache_limit=65536):
        """``cache_limit``: most cached ``match`` results (0 disables the cache)."""
        self._exact = {}
        self._root = None
        self._cache = {}
        self._npatterns = 0
        self._cache_limit = cache_limit if cache_limit > 0 else 0

    cpdef bint add(self, str pattern, object key) except -1:
        """Register ``key`` under ``pattern`` (exact channel or glob); True if new."""
        cdef dict keys
        cdef bytes raw
        cdef _Node node, child
        cdef _Pattern entry
        cdef Py_ssize_t j, n
        cdef const unsigned char* b
        if not _is_pattern(pattern):
            keys = self._exact.get(pattern)
            if keys is None:
                keys = {}
                self._exact[pattern] = keys
            elif key in keys:
                return False
            keys[key] = None
            self._cache.pop(pattern, None)
            return True
        raw = pattern.encode("utf-8")
        if self._root is None:
            self._root = _Node()
        node = <_Node>self._root
        n = _literal_prefix_len(raw)
        b = <const unsigned char*>PyBytes_AS_STRING(raw)
        for j in range(n):
            child = node.children.get(b[j])
            if child is None:
                child = _Node()
                node.children[b[j]] = child
            node = child
        entry = node.patterns.get(pattern)
        if entry is None:
            entry = _Pattern(raw)
            node.patterns[pattern] = entry
            self._npatterns += 1
        elif key in entry.keys:
            return False
        entry.keys[key] = None
        _invalidate_pattern(self, raw)
        return True

    cpdef bint remove(self, str pattern, object key) except -1:
        """Unregister ``key`` from ``pattern``; True if it was registered there.

        Trie nodes left with no pattern and no child are freed.
        """
        cdef dict keys
        cdef bytes raw
        cdef _Node node, child
        cdef _Pattern entry
        cdef list path
        cdef Py_ssize_t j, n
        cdef const unsigned char* b
        if not _is_pattern(pattern):
            keys = self._exact.get(pattern)
            if keys is None or key not in keys:
                return False
            del keys[key]
            if not keys:
                del self._exact[pattern]
            self._cache.pop(pattern, None)
            return True
        if self._root is None:
            return False
        raw = pattern.encode("utf-8")
        n = _literal_prefix_len(raw)
        b = <const unsigned char*>PyBytes_AS_STRING(raw)
        node = <_Node>self._root
        path = [node]
        for j in range(n):
            node = node.children.get(b[j])
            if node is None:
                return False
            path.append(node)
        entry = node.patterns.get(pattern)
        if entry is None or key not in entry.keys:
            return False
        del entry.keys[key]
        if not entry.keys:
            del node.patterns[pattern]
            self._npatterns -= 1
            # Free the now useless tail of the path, deepest node first.
            j = n
            while j >= 0:
                node = <_Node>path[j]
                if node.children or node.patterns:
                    break
                if j == 0:
                    self._root = None
                else:
                    del (<_Node>path[j - 1]).children[b[j - 1]]
                j -= 1
        _invalidate_pattern(self, raw)
        return True

    cpdef tuple match(self, str channel):
        """Distinct keys subscribed to ``channel`` or to a pattern matching it.

        Order is deterministic: exact subscribers first, then pattern
        subscribers by trie depth and pattern insertion order.
        """
        cdef object cached = self._cache.get(channel)
        cdef dict exact, single, acc
        cdef tuple result
        cdef bytes raw
        cdef const unsigned char* b
        cdef Py_ssize_t j, n
        cdef _Node node
        cdef _Pattern entry
        if cached is not None:
            return <tuple>cached
        exact = self._exact.get(channel)
        if self._root is None:
            result = tuple(exact) if exact is not None else ()
        else:
            single = exact
            acc = None
            raw = channel.encode("utf-8")
            b = <const unsigned char*>PyBytes_AS_STRING(raw)
            n = PyBytes_GET_SIZE(raw)
            node = <_Node>self._root
            j = 0
            while True:
                if node.patterns:
                    for entry in node.patterns.values():
                        if not c_glob_match(<const unsigned char*>PyBytes_AS_STRING(entry.raw),
                                            PyBytes_GET_SIZE(entry.raw), b, n):
                            continue
                        if acc is not None:
                            acc.update(entry.keys)
                        elif single is None:
                            single = entry.keys
                        else:
                            acc = dict(single)
                            acc.update(entry.keys)
                if j == n or not node.children:
                    break
                node = node.children.get(b[j])
                if node is None:
                    break
                j += 1
            if acc is not None:
                result = tuple(acc)
            elif single is not None:
                result = tuple(single)
            else:
                result = ()
        if self._cache_limit:
            if len(self._cache) >= self._cache_limit:
                self._cache.clear()
            self._cache[channel] = result
        return result

    cpdef Py_ssize_t count(self):
        """Distinct channels and patterns with at least one key."""
        return len(self._exact) + self._npatterns

    cpdef tuple keys(self, str pattern):
        """Keys registered under exactly this channel or pattern string."""
        cdef dict keys
        cdef _Node node
        cdef _Pattern entry
        if not _is_pattern(pattern):
            keys = self._exact.get(pattern)
            return tuple(keys) if keys is not None else ()
        node = _find(self, pattern.encode("utf-8"))
        if node is None:
            return ()
        entry = node.patterns.get(pattern)
        return tuple(entry.keys) if entry is not None else ()

    def names(self):
        """Every channel and pattern with at least one key (exact ones first)."""
        cdef list out = list(self._exact)
        cdef list todo = [] if self._root is None else [self._root]
        cdef _Node node
        while todo:
            node = <_Node>todo.pop()
            out.extend(node.patterns)
            todo.extend(node.children.values())
        return out

    def __len__(self):
        return self.count()

    def _node_count(self) -> int:
        """Trie nodes allocated (0 when no pattern is registered); for tests."""
        return 0 if self._root is None else (<_Node>self._root).count()

    def _cache_size(self) -> int:
        """Cached ``match`` results; for tests."""
        return len(self._cache)
