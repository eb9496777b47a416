# C-level interface of the broadcast loop (implementation in _fanout.pyx).
from cpython.object cimport PyObject
from fastws._picows cimport MemoryBuffer, WSListener, WSTransport
from fastws._match cimport Trie


cdef class Conn(WSListener):
    cdef WSTransport tr               # Python: the `transport` property (adopts on set)
    cdef public Hub hub
    cdef char* _buf                 # frames queued in this loop pass
    cdef Py_ssize_t _len
    cdef Py_ssize_t _cap
    cdef public bint queued         # in the hub's pending list
    cdef public bint closing        # no more deliveries
    cdef public bint active         # received something since the last heartbeat sweep
    cdef public double idle_since
    cdef public double ping_sent
    cdef public bint relay          # not a WebSocket: the hub calls its deliver(frame) (SSE, long-poll)

    cdef public unsigned char deflate   # permessage-deflate: 0 no, 1 yes, 2 yes but sent plain

    cdef int _append(self, const char* ptr, Py_ssize_t size) except -1
    cdef int _send_raw(self, const char* ptr, Py_ssize_t size) except -1
    cdef int _write_out(self) noexcept
    cpdef send_frame(self, bytes frame)
    cpdef send_text(self, bytes payload)
    cpdef flush_now(self)


cdef class Hub:
    cdef Trie _trie                 # subscriptions: change only through the Hub's methods
    cdef PyObject** _pend           # connections with frames queued in this pass (owned refs)
    cdef Py_ssize_t _npend
    cdef Py_ssize_t _pend_cap
    cdef bint _scheduled
    cdef object _call_soon
    cdef object _flush_cb
    cdef set _conns                 # open connections: add_connection / remove_connection
    cdef public Py_ssize_t send_buffer
    cdef public object on_slow          # callable(conn), Python level
    cdef public object on_heartbeat_timeout
    # hot-path counters, read at scrape time
    cdef readonly unsigned long long publications
    cdef readonly unsigned long long deliveries
    cdef readonly unsigned long long bytes_sent
    cdef readonly unsigned long long writes
    cdef readonly unsigned long long slow_consumers
    cdef readonly Py_ssize_t compressed_connections
    cdef readonly unsigned long long compressed_publications
    cdef public Py_ssize_t compression_min_size  # payloads shorter than this go out plain
    # delivery latency (publication accepted -> written), one observation per publication
    cdef double* _accepted
    cdef Py_ssize_t _naccepted
    cdef Py_ssize_t _accepted_cap
    cdef unsigned long long _lat_counts[16]
    cdef double _lat_sum
    cdef unsigned long long _lat_count

    cpdef Py_ssize_t broadcast(self, str channel, bytes frame, double accepted, bint exact_only=*,
                               object skip=*) except -1
    cpdef flush(self)
    cdef int _schedule(self) except -1
    cdef int _grow_pending_to(self, Py_ssize_t need) except -1
    cdef int _observe_pass(self) except -1
    cdef _grow_accepted(self)
    cdef _slow(self, Conn c)
