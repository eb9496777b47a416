# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled subscriber hot path for loadtest.fanout (built on first use by loadtest._build).

``FastSubscriber.on_ws_frame`` is a picows vtable call; for an event push it finds
``"t":`` and ``"seq":`` in the payload with ``memmem``, parses two integers, does the
seq accounting and the latency histogram in C: no Python object per delivery.
Anything else (replies, close frames) goes to the Python-level methods of the same
shape as loadtest.fanout.Subscriber.  A compressed frame (RSV1, permessage-deflate
negotiated with ``--compression``) is inflated first, in C, into one buffer per process
(the server's answer carries ``server_no_context_takeover``: each message stands alone).
"""

from libc.stdint cimport int64_t
from libc.stdlib cimport calloc, free, realloc
from libc.string cimport memcmp
from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec

from picows.picows cimport WSFrame, WSListener, WSMsgType, WSTransport

cdef extern from "<string.h>" nogil:
    void* memmem(const void* haystack, size_t haystacklen, const void* needle, size_t needlelen)

cdef extern from "<zlib.h>" nogil:
    ctypedef struct z_stream:
        unsigned char* next_in
        unsigned int avail_in
        unsigned char* next_out
        unsigned int avail_out
        void* zalloc
        void* zfree
        void* opaque
    int Z_OK, Z_SYNC_FLUSH, Z_BUF_ERROR
    int inflateInit2(z_stream* strm, int windowBits)
    int inflate(z_stream* strm, int flush)
    int inflateReset(z_stream* strm)

cdef z_stream _zs
cdef bint _zs_ready = False
cdef char* _zout = NULL
cdef Py_ssize_t _zcap = 0
cdef unsigned char[4] _TAIL = [0, 0, 0xFF, 0xFF]
cdef int64_t _inflate_every = 1     # --inflate-every


def set_inflate_every(int64_t k):
    """Inflate one compressed push in ``k`` per subscriber (1: every one).

    A skipped push is counted as the next publication (``last + 1``) without being
    read; the next inflated one must then carry exactly that number plus one, so a
    lost or doubled push anywhere in between still shows as a gap or a duplicate.
    Latency comes from the inflated pushes only.  Inflating costs this client ~5 µs
    per ~1 KB push (zlib decodes the Huffman tables of every message): with every
    push inflated, one 2-vCPU box cannot read what the server sends at saturation."""
    global _inflate_every
    _inflate_every = k if k > 1 else 1


cdef Py_ssize_t _inflate(const char* p, Py_ssize_t n) noexcept:
    """Inflate one whole message into _zout; its size, or -1 on bad data."""
    global _zs_ready, _zout, _zcap
    cdef Py_ssize_t have = 0
    cdef int rc
    cdef int part
    if not _zs_ready:
        if inflateInit2(&_zs, -15) != Z_OK:
            return -1
        _zs_ready = True
    else:
        inflateReset(&_zs)
    for part in range(2):
        if part == 0:
            _zs.next_in = <unsigned char*>p
            _zs.avail_in = <unsigned int>n
        else:
            _zs.next_in = _TAIL
            _zs.avail_in = 4
        while True:
            if _zcap - have < 4096:
                _zcap = _zcap * 2 if _zcap else 65536
                _zout = <char*>realloc(_zout, _zcap)
                if _zout == NULL:
                    return -1
            _zs.next_out = <unsigned char*>(_zout + have)
            _zs.avail_out = <unsigned int>(_zcap - have)
            rc = inflate(&_zs, Z_SYNC_FLUSH)
            have = _zcap - _zs.avail_out
            if rc != Z_OK and rc != Z_BUF_ERROR:
                return -1
            if _zs.avail_in == 0 and _zs.avail_out != 0:
                break
    return have


cdef enum:
    HIST_BUCKETS = 512   # = loadtest.fanout.HIST_BUCKETS
    SPREAD_SEQS = 1 << 20   # publications whose slowest delivery is tracked (8 MiB)
    MAX_LANES = 64       # = loadtest.fanout.MAX_LANES


cdef inline int64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline int _bit_length(int64_t v) noexcept nogil:
    cdef int n = 0
    while v:
        v >>= 1
        n += 1
    return n


cdef inline const char* _parse_int(const char* p, const char* end, int64_t* out) noexcept nogil:
    """Parse a non-negative decimal at p; return the first byte after it (NULL: none)."""
    cdef int64_t v = 0
    cdef const char* start = p
    while p < end and p[0] == 32:   # ' '
        p += 1
    start = p
    while p < end and 48 <= p[0] <= 57:   # '0'..'9'
        v = v * 10 + (p[0] - 48)
        p += 1
    if p == start:
        return NULL
    out[0] = v
    return p


cdef class CStats:
    """Counters of all subscribers of one process, C integers (same names as fanout.Stats)."""

    cdef public int64_t win_start, win_end
    cdef public int64_t received, in_window, duplicates, gaps, max_us
    cdef public int64_t disconnected, bad_frames
    cdef public int64_t lanes    # publishers numbering their own (fanout.seq_check)
    cdef public int64_t wire_bytes, compressed   # payload bytes as received; RSV1 frames
    cdef public bint closing
    cdef public dict close_codes
    cdef public str first_error
    cdef int64_t _hist[HIST_BUCKETS]
    cdef int64_t* _spread      # seq -> slowest delivery (µs) in this process, 0: none

    def __cinit__(self):
        self._spread = <int64_t*>calloc(SPREAD_SEQS, sizeof(int64_t))
        if self._spread == NULL:
            raise MemoryError()
        self.win_start = 1 << 62
        self.win_end = 1 << 62
        self.lanes = 1
        self.close_codes = {}
        self.first_error = ""
        cdef int i
        for i in range(HIST_BUCKETS):
            self._hist[i] = 0

    def __dealloc__(self):
        free(self._spread)

    def spread(self):
        """{seq: µs} of the slowest delivery of each publication seen by this process:
        publish → the last of its subscribers here received it."""
        cdef dict out = {}
        cdef Py_ssize_t i
        for i in range(SPREAD_SEQS):
            if self._spread[i]:
                out[i] = self._spread[i]
        return out

    @property
    def hist(self):
        """The latency histogram as a list (fanout.hist_index buckets)."""
        return [self._hist[i] for i in range(HIST_BUCKETS)]

    cdef inline void account(self, int64_t t, int64_t now, int64_t seq) noexcept:
        cdef int64_t us
        cdef int s
        cdef int64_t idx
        if 0 < seq < SPREAD_SEQS:
            us = (now - t) // 1000
            if us > self._spread[seq]:
                self._spread[seq] = us if us > 0 else 1
        if self.win_start <= now < self.win_end:
            self.in_window += 1
            us = (now - t) // 1000
            if us < 32:
                idx = us if us > 0 else 0
            else:
                s = _bit_length(us) - 5
                idx = (s << 4) + (us >> s)
                if idx >= HIST_BUCKETS:
                    idx = HIST_BUCKETS - 1
                if us > self.max_us:
                    self.max_us = us
            self._hist[idx] += 1


cdef class FastSubscriber(WSListener):
    """One subscriber connection; the event path is C, the rest calls Python methods."""

    cdef public CStats stats
    cdef public int64_t last
    cdef public object transport
    cdef public object subscribed
    cdef public object on_reply       # callable(self, bytes) for non-event TEXT frames
    cdef public object on_control     # callable(self, transport, frame) for the rest
    cdef int64_t* lane_last           # lanes > 1: last number seen of each lane
    cdef int64_t skip                 # compressed pushes to count without inflating

    def __init__(self, CStats stats, on_reply, on_control):
        self.stats = stats
        self.last = 0
        self.transport = None
        self.subscribed = None
        self.on_reply = on_reply
        self.on_control = on_control
        self.lane_last = NULL

    def __dealloc__(self):
        free(self.lane_last)

    cpdef on_ws_connected(self, WSTransport transport):
        self.transport = transport

    cpdef on_ws_frame(self, WSTransport transport, WSFrame frame):
        cdef const char* p = frame.payload_ptr
        cdef Py_ssize_t n = frame.payload_size
        cdef const char* end = p + n
        cdef const char* q
        cdef const char* r
        cdef int64_t t = 0, seq = 0, now
        cdef CStats st = self.stats
        if frame.msg_type != WSMsgType.TEXT:
            self.on_control(self, transport, frame)
            return
        st.wire_bytes += n
        if frame.rsv1:
            if self.skip > 0 and st.lanes <= 1 and self.last > 0:
                self.skip -= 1          # --inflate-every: counted as the next one
                self.last += 1
                st.received += 1
                st.compressed += 1
                now = _now_ns()
                if st.win_start <= now < st.win_end:
                    st.in_window += 1
                return
            self.skip = _inflate_every - 1
            n = _inflate(p, n)
            if n < 0:
                st.bad_frames += 1
                return
            st.compressed += 1
            p = _zout
            end = p + n
        q = <const char*>memmem(p, n, b'"t":', 4)
        if q == NULL:
            self.on_reply(self, p[:n])
            return
        now = _now_ns()
        q = _parse_int(q + 4, end, &t)
        if q == NULL:
            st.bad_frames += 1
            return
        if end - q >= 7 and memcmp(q, b',"seq":', 7) == 0:
            r = q + 7
        else:
            r = <const char*>memmem(p, n, b'"seq":', 6)
            if r == NULL:
                st.bad_frames += 1
                return
            r += 6
        if _parse_int(r, end, &seq) == NULL:
            st.bad_frames += 1
            return
        st.received += 1
        if st.lanes > 1:
            self._lane_check(st, seq)
        elif seq == self.last + 1:
            self.last = seq
        elif seq <= self.last:
            st.duplicates += 1
        else:
            st.gaps += 1
            self.last = seq
        st.account(t, now, seq)

    cdef void _lane_check(self, CStats st, int64_t seq) noexcept:
        """fanout.seq_check with lanes: each lane in order, ``last`` counts distinct."""
        cdef int64_t lane = (seq - 1) % st.lanes
        cdef int64_t idx = (seq - 1) // st.lanes + 1
        if self.lane_last == NULL:
            self.lane_last = <int64_t*>calloc(MAX_LANES, sizeof(int64_t))
            if self.lane_last == NULL:
                st.bad_frames += 1
                return
        if lane >= MAX_LANES or seq < 1:
            st.bad_frames += 1
            return
        if idx <= self.lane_last[lane]:
            st.duplicates += 1
            return
        if idx != self.lane_last[lane] + 1:
            st.gaps += 1
        self.lane_last[lane] = idx
        self.last += 1

    cpdef on_ws_disconnected(self, WSTransport transport):
        if not self.stats.closing:
            self.stats.disconnected += 1
        fut = self.subscribed
        if fut is not None and not fut.done():
            fut.set_exception(ConnectionError("disconnected before subscribed"))
