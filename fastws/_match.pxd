# C-level interface of the channel matcher (implementation in _match.pyx).
# Other compiled modules (the broadcast loop in _fanout.pyx) cimport this.

cdef bint c_glob_match(const unsigned char* pat, Py_ssize_t plen,
                       const unsigned char* s, Py_ssize_t slen) noexcept nogil


cdef class Trie:
    cdef dict _exact          # channel (str) -> dict {key: None} (insertion ordered)
    cdef object _root         # prefix-trie root for patterns (layout is the implementation's)
    cdef dict _cache          # channel (str) -> tuple of distinct keys
    cdef Py_ssize_t _npatterns
    cdef Py_ssize_t _cache_limit

    cpdef bint add(self, str pattern, object key) except -1
    cpdef bint remove(self, str pattern, object key) except -1
    cpdef tuple match(self, str channel)
    cpdef Py_ssize_t count(self)
    cpdef tuple keys(self, str pattern)   # keys under exactly this name (no glob)
