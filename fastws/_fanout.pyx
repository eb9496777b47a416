# cython: language_level=3
"""The broadcast loop: one pre-framed publication, written to every matched connection.

A publication is framed once (``make_frame``) and the same bytes are copied into the
per-connection queue of every receiver.  All frames queued for one connection during
one event-loop pass leave in one write (``Hub.flush`` runs once per pass, via
``call_soon``).  No Python object is created per delivery; counters are C integers.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.object cimport PyObject
from cpython.ref cimport Py_XDECREF, Py_XINCREF
from libc.stdint cimport uint8_t, uint16_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy, memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from fastws._picows cimport MemoryBuffer, WSListener, WSMsgType, WSTransport

from fastws._match cimport Trie

import asyncio


cdef extern from "<arpa/inet.h>" nogil:
    uint16_t htons(uint16_t)

cdef extern from "<endian.h>" nogil:
    uint64_t htobe64(uint64_t)

cdef extern from "<zlib.h>" nogil:
    ctypedef struct z_stream:
        unsigned char* next_in
        unsigned int avail_in
        unsigned char* next_out
        unsigned int avail_out
        void* zalloc
        void* zfree
        void* opaque
    int Z_OK, Z_SYNC_FLUSH, Z_DEFLATED, Z_DEFAULT_STRATEGY, Z_BUF_ERROR
    int deflateInit2(z_stream* strm, int level, int method, int windowBits, int memLevel,
                     int strategy)
    int deflate(z_stream* strm, int flush)
    int deflateReset(z_stream* strm)
    unsigned long deflateBound(z_stream* strm, unsigned long sourceLen)

cdef extern from "Python.h":
    # the item array of a tuple, read without a call or a reference count per item
    ctypedef struct PyTupleObject:
        PyObject* ob_item[1]

cdef enum:
    LAT_BUCKETS = 14

# A server PING frame with no payload (FIN, opcode 9, unmasked): the heartbeat writes it
# like any queued frame, without touching picows' per-transport write buffer.
cdef bytes _PING_FRAME = b"\x89\x00"

# Upper bounds (seconds) of the delivery latency histogram buckets; +Inf is implicit.
cdef double[LAT_BUCKETS] _LAT_BOUNDS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                                        0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
LATENCY_BUCKETS = tuple(_LAT_BOUNDS[i] for i in range(LAT_BUCKETS))


# The first allocation of a connection's queue in a pass: the average queue of the last
# pass (256 B to 8 KiB), so that a pass of many publications grows each queue in one
# malloc instead of a chain of reallocs (and copies) from 256 B.
cdef Py_ssize_t _first_cap = 256
cdef enum:
    FIRST_CAP_MIN = 256
    FIRST_CAP_MAX = 8192


cdef inline Py_ssize_t _first_capacity(Py_ssize_t average) noexcept nogil:
    cdef Py_ssize_t cap = FIRST_CAP_MIN
    while cap < average and cap < FIRST_CAP_MAX:
        cap *= 2
    return cap


cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cpdef bytes make_frame(bytes payload, int opcode=1, bint rsv1=False):
    """Return a complete unmasked server frame (FIN set) carrying ``payload``.

    Server frames are never masked, so one such buffer serves every receiver.  ``rsv1``
    marks a payload compressed with permessage-deflate (see :func:`deflate_payload`).
    """
    return _frame(PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload), opcode, rsv1)


cdef bytes _frame(const char* payload, Py_ssize_t n, int opcode, bint rsv1):
    cdef Py_ssize_t hdr = 2 if n < 126 else (4 if n < 65536 else 10)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, hdr + n)
    cdef uint8_t* p = <uint8_t*>PyBytes_AS_STRING(out)
    p[0] = 0x80 | (0x40 if rsv1 else 0) | (opcode & 0x0F)
    if n < 126:
        p[1] = <uint8_t>n
    elif n < 65536:
        p[1] = 126
        (<uint16_t*>(p + 2))[0] = htons(<uint16_t>n)
    else:
        p[1] = 127
        (<uint64_t*>(p + 2))[0] = htobe64(<uint64_t>n)
    memcpy(p + hdr, payload, n)
    return out


# ------------------------------------------------------------------ permessage-deflate
# One deflate stream per process (one event loop per process), reset per message: the
# answer to every offer carries server_no_context_takeover, so no connection keeps a
# compressor.  Its ~270 KB are allocated on the first compressed message.

DEFLATE_LEVEL = 6
cdef z_stream _zs
cdef bint _zs_ready = False
cdef char* _zbuf = NULL
cdef Py_ssize_t _zcap = 0


cdef Py_ssize_t _deflate(const char* data, Py_ssize_t n) except -2:
    """Raw-deflate ``n`` bytes into ``_zbuf`` (sync flush, 00 00 ff ff stripped).

    Returns the compressed size, or -1 when it is not smaller than ``n``.
    """
    global _zs_ready, _zbuf, _zcap
    cdef Py_ssize_t bound
    cdef int rc
    cdef char* nbuf
    cdef Py_ssize_t out
    if not _zs_ready:
        memset(&_zs, 0, sizeof(z_stream))
        if deflateInit2(&_zs, DEFLATE_LEVEL, Z_DEFLATED, -15, 8, Z_DEFAULT_STRATEGY) != Z_OK:
            raise MemoryError("deflateInit2 failed")
        _zs_ready = True
    else:
        deflateReset(&_zs)
    if n > 0x7FFFFFFF:
        return -1
    bound = deflateBound(&_zs, n) + 16
    if bound > _zcap:
        nbuf = <char*>realloc(_zbuf, bound)
        if nbuf == NULL:
            raise MemoryError()
        _zbuf = nbuf
        _zcap = bound
    _zs.next_in = <unsigned char*>data
    _zs.avail_in = <unsigned int>n
    _zs.next_out = <unsigned char*>_zbuf
    _zs.avail_out = <unsigned int>bound
    rc = deflate(&_zs, Z_SYNC_FLUSH)
    if (rc != Z_OK and rc != Z_BUF_ERROR) or _zs.avail_in != 0:
        return -1
    out = bound - _zs.avail_out - 4        # the sync flush ends with 00 00 ff ff
    if out >= n:
        return -1                          # deflate does not make it smaller
    return out


cpdef bytes deflate_payload(bytes payload):
    """``payload`` compressed for one permessage-deflate message (RFC 7692 7.2.1), or
    None when deflate does not make it smaller.  No context is kept between calls."""
    cdef Py_ssize_t n = _deflate(PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload))
    if n < 0:
        return None
    return PyBytes_FromStringAndSize(_zbuf, n)


cdef bytes _deflate_frame(bytes frame):
    """The RSV1 (compressed) version of a pre-built data frame, or None if deflate does
    not shrink its payload."""
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(frame)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(frame)
    cdef Py_ssize_t hdr
    cdef Py_ssize_t n
    cdef int opcode = p[0] & 0x0F
    if size < 2 or (p[0] & 0x70) or (opcode != 1 and opcode != 2) or not (p[0] & 0x80):
        return None
    hdr = 2 if (p[1] & 0x7F) < 126 else (4 if (p[1] & 0x7F) == 126 else 10)
    n = _deflate(<const char*>p + hdr, size - hdr)
    if n < 0:
        return None
    return _frame(_zbuf, n, opcode, True)


cdef class Conn(WSListener):
    """Per-connection delivery state; the server's listener class derives from it.

    Call :meth:`send_frame` / :meth:`send_text` for everything the application sends,
    so that replies and pushes keep their order relative to queued publications.
    """

    def __cinit__(self):
        self._buf = NULL
        self._len = 0
        self._cap = 0
        self.queued = False
        self.closing = False
        self.active = True
        self.idle_since = 0.0
        self.ping_sent = 0.0
        self.deflate = 0

    def __dealloc__(self):
        if self._buf != NULL:
            free(self._buf)
            self._buf = NULL

    @property
    def transport(self):
        """The picows transport (None before ``on_ws_connected``).

        Setting it (once, in ``on_ws_connected``) also drops what picows keeps per
        connection and a server never reads again (see ``_trim_transport``): ~2.7 KB
        of an idle connection's ~5.5 KB.  picows is pinned (2.3.1) and
        tests/test_loadtest_memory.py checks these fields, so an upgrade that moves
        them fails there.
        """
        return self.tr

    @transport.setter
    def transport(self, WSTransport value):
        self.tr = value
        if value is not None:
            _trim_transport(value)

    cdef int _append(self, const char* ptr, Py_ssize_t size) except -1:
        cdef Py_ssize_t need = self._len + size
        cdef Py_ssize_t cap
        cdef char* nbuf
        if need > self._cap:
            cap = self._cap * 2 if self._cap else _first_cap
            while cap < need:
                cap *= 2
            nbuf = <char*>realloc(self._buf, cap)
            if nbuf == NULL:
                raise MemoryError()
            self._buf = nbuf
            self._cap = cap
        memcpy(self._buf + self._len, ptr, size)
        self._len = need
        return 0

    cdef int _write_out(self) noexcept:
        """Hand the queue to the transport in one write; an idle connection keeps no queue.

        A failing write (the socket is gone) stops deliveries to this connection; picows
        reports the disconnect itself.  Returns -1 then, else 0.
        """
        cdef WSTransport tr = self.tr
        cdef Py_ssize_t n = self._len
        cdef char* buf = self._buf
        cdef int rc = 0
        self._len = 0
        self._buf = NULL
        self._cap = 0
        if n == 0 or tr is None or tr.is_disconnected or tr.is_close_frame_sent:
            free(buf)
            return 0
        try:
            tr._fast_write(buf, n)
        except BaseException:
            self.closing = True
            rc = -1
        free(buf)
        if rc == 0 and self.hub is not None:
            self.hub.bytes_sent += n
            self.hub.writes += 1
        return rc

    cdef int _send_raw(self, const char* ptr, Py_ssize_t size) except -1:
        """Send ``size`` bytes of whole frames after everything already queued.

        With nothing queued they go straight to the transport (no copy, no queue).
        """
        cdef WSTransport tr
        if self.queued:
            return self._append(ptr, size)
        if self._len:
            self._append(ptr, size)
            self._write_out()
            return 0
        tr = self.tr
        if tr is None or tr.is_disconnected or tr.is_close_frame_sent:
            return 0
        tr._fast_write(<char*>ptr, size)
        if self.hub is not None:
            self.hub.bytes_sent += size
            self.hub.writes += 1
        return 0

    @property
    def pending_bytes(self) -> int:
        """Bytes queued in this loop pass, not yet handed to the transport."""
        return self._len

    cpdef send_frame(self, bytes frame):
        """Send a pre-built frame after everything already queued for this connection."""
        if self.closing:
            return
        self._send_raw(PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame))

    cpdef send_text(self, bytes payload):
        """Frame ``payload`` as one TEXT message and send it in order (see send_frame)."""
        self.send_frame(make_frame(payload, 1))

    cpdef flush_now(self):
        """Write whatever is queued for this connection now (before a close frame)."""
        self._write_out()


# What _trim_transport shares between all the transports of one thread (one loop).
cdef MemoryBuffer _shared_write_buffer = None
cdef object _done_loop = None
cdef object _done_future = None


cdef int _trim_transport(WSTransport tr) except -1:
    """Drop what picows keeps per connection and a server never reads again.

    * ``request``/``response``: the parsed upgrade and the 101 answer, read by nobody
      after ``on_ws_connected`` (~1.5 KB with their header multidicts);
    * ``listener_proxy``: a weakref proxy only picows' auto-ping loop uses (we run our
      own heartbeat, auto-ping is off);
    * ``_write_buffer``: picows builds a frame there in ``send``/``send_close``/
      ``send_pong`` and hands it to the socket (or a copy to the transport) before
      returning, so one buffer per thread serves every transport instead of 1 KiB each;
    * ``disconnected_future``: one already-done future per loop instead of one pending
      future per connection (``wait_disconnected()`` is a client-side API).
    """
    global _shared_write_buffer, _done_loop, _done_future
    tr.request = None
    tr.response = None
    tr.listener_proxy = None
    if tr._loop is not _done_loop:     # first transport of this loop
        _done_loop = tr._loop
        _done_future = _done_loop.create_future()
        _done_future.set_result(None)
        _shared_write_buffer = MemoryBuffer(1024)
    tr._write_buffer = _shared_write_buffer
    tr.disconnected_future = _done_future
    return 0


cdef class Hub:
    """The local registry and the fan-out loop.

    The hub owns this process's registrations: the set of open connections and the
    :class:`Trie` of their subscriptions change only through its methods
    (:meth:`add_connection`, :meth:`remove_connection`, :meth:`subscribe`,
    :meth:`unsubscribe`); the node and the transports read them through
    :meth:`connections`, :meth:`has_subscribers`, :meth:`subscribers` and the counts.
    """

    def __cinit__(self):
        self._pend = NULL
        self._npend = 0
        self._pend_cap = 0
        self._accepted = NULL
        self._naccepted = 0
        self._accepted_cap = 0
        cdef int i
        for i in range(16):
            self._lat_counts[i] = 0
        self._lat_sum = 0.0
        self._lat_count = 0

    def __init__(self, Py_ssize_t send_buffer=1048576, loop=None):
        self._trie = Trie()
        self._scheduled = False
        loop = loop if loop is not None else asyncio.get_event_loop()
        self._call_soon = loop.call_soon
        self._flush_cb = self.flush
        self._conns = set()
        self.send_buffer = send_buffer
        self.on_slow = None
        self.on_heartbeat_timeout = None
        self.publications = 0
        self.deliveries = 0
        self.bytes_sent = 0
        self.writes = 0
        self.slow_consumers = 0
        self.compressed_connections = 0
        self.compressed_publications = 0
        self.compression_min_size = 512

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self._accepted != NULL:
            free(self._accepted)
        if self._pend != NULL:
            for i in range(self._npend):
                Py_XDECREF(self._pend[i])
            free(self._pend)

    cdef int _schedule(self) except -1:
        if not self._scheduled:
            self._scheduled = True
            self._call_soon(self._flush_cb)
        return 0

    cpdef Py_ssize_t broadcast(self, str channel, bytes frame, double accepted,
                               bint exact_only=False, object skip=None) except -1:
        """Queue ``frame`` for every connection subscribed to ``channel``.

        Each connection gets it once however many of its subscriptions match.  With
        ``exact_only`` pattern subscriptions are ignored (private namespaces).  Returns
        the number of receivers.  ``accepted`` is the monotonic time the publication
        was accepted, for the delivery latency histogram; a negative ``accepted`` marks
        a push that is not a publication (presence join/leave): it is delivered the same
        way but counted in no publication metric.  ``skip``: a connection that does not
        get it (the sender of an ``echo: false`` publication).
        """
        cdef tuple keys
        cdef PyObject* skipped = <PyObject*>skip   # compared by address: no call
        cdef bytes zframe = None        # the compressed frame, built on first need
        cdef bint zmay = False          # compression still possible for this publication
        cdef bint zbuilt = False
        cdef const char* zptr = NULL    # zframe's bytes, once built (NULL: none)
        cdef Py_ssize_t zsize = 0
        cdef const char* p
        cdef Py_ssize_t s
        if exact_only:
            keys = self._trie.keys(channel)
        else:
            keys = self._trie.match(channel)
        cdef const char* ptr = PyBytes_AS_STRING(frame)
        cdef Py_ssize_t size = PyBytes_GET_SIZE(frame)
        cdef Py_ssize_t n = 0
        cdef Py_ssize_t i
        cdef Py_ssize_t m = len(keys)
        # the tuple keeps its connections alive for this call: borrowed pointers, no
        # reference counting and no Python call per delivery (cython -a: all white)
        cdef PyObject** items = (<PyTupleObject*>keys).ob_item
        cdef PyObject* o
        cdef bint publication = accepted >= 0
        if publication:
            self.publications += 1
        if self.compressed_connections and size > 2:   # the payload's size, headers apart
            s = (<const uint8_t*>ptr)[1] & 0x7F
            zmay = size - (2 if s < 126 else (4 if s == 126 else 10)) >= self.compression_min_size
        for i in range(m):
            o = items[i]
            if (<Conn>o).closing or o == skipped:
                continue
            if (<Conn>o).relay:     # SSE / long-poll (fastws.fallback): Python-level delivery
                if (<object>o).deliver(frame):
                    n += 1
                continue
            p = ptr
            s = size
            if (<Conn>o).deflate == 1 and zmay:
                if not zbuilt:          # once per publication, for all its receivers
                    zbuilt = True
                    zframe = _deflate_frame(frame)
                    if zframe is None:
                        zmay = False
                    else:
                        self.compressed_publications += 1
                        zptr = PyBytes_AS_STRING(zframe)
                        zsize = PyBytes_GET_SIZE(zframe)
                if zptr != NULL:
                    p = zptr
                    s = zsize
            if (<Conn>o)._len + s > self.send_buffer:
                self._slow(<Conn>o)
                continue
            (<Conn>o)._append(p, s)
            if not (<Conn>o).queued:
                (<Conn>o).queued = True
                if self._npend == self._pend_cap:
                    self._grow_pending_to(self._npend + 1)
                Py_XINCREF(o)                   # owned by the pending array until flush
                self._pend[self._npend] = o
                self._npend += 1
            n += 1
        if n:
            if publication:
                self.deliveries += n
                if self._naccepted == self._accepted_cap:
                    self._grow_accepted()
                self._accepted[self._naccepted] = accepted
                self._naccepted += 1
            self._schedule()
        return n

    cdef int _grow_pending_to(self, Py_ssize_t need) except -1:
        cdef Py_ssize_t cap = self._pend_cap * 2 if self._pend_cap else 256
        cdef PyObject** nbuf
        while cap < need:
            cap *= 2
        nbuf = <PyObject**>realloc(self._pend, cap * sizeof(PyObject*))
        if nbuf == NULL:
            raise MemoryError()
        self._pend = nbuf
        self._pend_cap = cap
        return 0

    cdef _grow_accepted(self):
        cdef Py_ssize_t cap = self._accepted_cap * 2 if self._accepted_cap else 64
        cdef double* nbuf = <double*>realloc(self._accepted, cap * sizeof(double))
        if nbuf == NULL:
            raise MemoryError()
        self._accepted = nbuf
        self._accepted_cap = cap

    cdef _slow(self, Conn c):
        c.closing = True
        c._len = 0
        self.slow_consumers += 1
        if self.on_slow is not None:
            self.on_slow(c)

    def mark_slow(self, Conn c):
        """Stop delivering to ``c`` at once and report it through ``on_slow``."""
        if not c.closing:
            self._slow(c)

    cpdef flush(self):
        """Write every connection's queued frames in one write each (runs once per pass)."""
        global _first_cap
        self._scheduled = False
        cdef Py_ssize_t total = 0
        cdef Py_ssize_t i
        cdef Py_ssize_t m = self._npend
        cdef PyObject** pend = self._pend
        cdef Py_ssize_t cap = self._pend_cap
        cdef PyObject* o
        self._pend = NULL           # a write may re-enter broadcast (a pause_writing
        self._npend = 0             # callback): it starts a fresh array
        self._pend_cap = 0
        for i in range(m):
            o = pend[i]
            (<Conn>o).queued = False
            if (<Conn>o).closing:
                (<Conn>o)._len = 0
            else:
                total += (<Conn>o)._len
                (<Conn>o)._write_out()
            Py_XDECREF(o)
        if m:
            _first_cap = _first_capacity(total // m)
        if pend != NULL:
            if self._pend == NULL:  # keep the array for the next pass
                self._pend = pend
                self._pend_cap = cap
            else:
                free(pend)
        if self._naccepted:
            self._observe_pass()

    cdef int _observe_pass(self) except -1:
        cdef double now = _now()
        cdef double d
        cdef Py_ssize_t i
        cdef int b
        for i in range(self._naccepted):
            d = now - self._accepted[i]
            if d < 0:
                d = 0
            self._lat_sum += d
            self._lat_count += 1
            b = 0
            while b < LAT_BUCKETS and d > _LAT_BOUNDS[b]:
                b += 1
            self._lat_counts[b] += 1
        self._naccepted = 0
        return 0

    def latency_snapshot(self):
        """Return (bucket upper bounds, cumulative counts incl. +Inf, sum, count)."""
        cdef list cumulative = []
        cdef unsigned long long acc = 0
        cdef int i
        for i in range(LAT_BUCKETS + 1):
            acc += self._lat_counts[i]
            cumulative.append(acc)
        return LATENCY_BUCKETS, cumulative, self._lat_sum, self._lat_count

    def count_sent(self, Py_ssize_t nbytes, Py_ssize_t writes=1):
        """Count ``writes`` writes of ``nbytes`` in all made outside the C queue
        (fastws.fallback)."""
        self.bytes_sent += nbytes
        self.writes += writes

    # ---------------------------------------------------------------- registrations

    def add_connection(self, Conn c):
        """Register an open connection (heartbeat sweep, drain, counts)."""
        if c not in self._conns:
            self._conns.add(c)
            if c.deflate:
                self.compressed_connections += 1

    def remove_connection(self, Conn c):
        """Forget a connection that ended (its subscriptions are removed separately)."""
        if c in self._conns:
            self._conns.discard(c)
            if c.deflate:
                self.compressed_connections -= 1

    def connections(self) -> list:
        """A snapshot list of the open connections (safe to close them while iterating)."""
        return list(self._conns)

    @property
    def connection_count(self) -> int:
        """How many connections are open."""
        return len(self._conns)

    def subscribe(self, str name, Conn c) -> bool:
        """Subscribe ``c`` to a channel or pattern; False if it already was."""
        return self._trie.add(name, c)

    def unsubscribe(self, str name, Conn c) -> bool:
        """Unsubscribe ``c`` from a channel or pattern; False if it was not subscribed."""
        return self._trie.remove(name, c)

    def has_subscribers(self, str name) -> bool:
        """True when some connection holds exactly ``name`` (a channel or a pattern)."""
        return len(self._trie.keys(name)) > 0

    def subscribers(self, str channel) -> tuple:
        """The distinct connections a publication on ``channel`` reaches (patterns too)."""
        return self._trie.match(channel)

    @property
    def name_count(self) -> int:
        """Distinct channels and patterns with a subscriber here."""
        return self._trie.count()

    def names(self):
        """Every channel and pattern with a subscriber here (metrics over workers)."""
        return self._trie.names()

    def sweep(self, double ping_interval, double pong_timeout):
        """Heartbeat: ping connections idle for ``ping_interval``; time out silent ones.

        Call about once a second.  A connection that sent nothing for
        ping_interval + pong_timeout is handed to ``on_heartbeat_timeout``.
        """
        cdef double now = _now()
        cdef Conn c
        cdef list expired = []
        for k in self._conns:
            c = <Conn>k
            if c.closing:
                continue
            if c.active:
                c.active = False
                c.idle_since = now
                c.ping_sent = 0.0
            elif c.ping_sent == 0.0:
                if now - c.idle_since >= ping_interval and c.tr is not None:
                    c.ping_sent = now
                    c._send_raw(PyBytes_AS_STRING(_PING_FRAME), 2)
            elif now - c.ping_sent >= pong_timeout:
                expired.append(c)
        if self.on_heartbeat_timeout is not None:
            for c in expired:
                self.on_heartbeat_timeout(c)
        return len(expired)
