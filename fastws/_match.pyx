# cython: language_level=3
"""Placeholder: replaced by the real trie matcher."""

cdef bint c_glob_match(const unsigned char* pat, Py_ssize_t plen,
                       const unsigned char* s, Py_ssize_t slen) noexcept nogil:
    return plen == slen


def glob_match(pattern, channel):
    return pattern == channel


cdef class Trie:
    def __init__(self, Py_ssize_t cache_limit=65536):
        self._exact = {}
        self._root = None
        self._cache = {}
        self._npatterns = 0
        self._cache_limit = cache_limit

    cpdef bint add(self, str pattern, object key) except -1:
        d = self._exact.setdefault(pattern, {})
        if key in d:
            return False
        d[key] = None
        return True

    cpdef bint remove(self, str pattern, object key) except -1:
        d = self._exact.get(pattern)
        if d is None or key not in d:
            return False
        del d[key]
        if not d:
            del self._exact[pattern]
        return True

    cpdef tuple match(self, str channel):
        d = self._exact.get(channel)
        return tuple(d) if d else ()

    cpdef Py_ssize_t count(self):
        return len(self._exact)
