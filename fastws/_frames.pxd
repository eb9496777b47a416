# C-level interface of the RFC 6455 message assembler (implementation in _frames.pyx).
# A compiled listener cimports this so that `feed`/`receive` are vtable calls:
#
#     from fastws._frames cimport MessageAssembler, receive
#
# Python code uses the same names through `fastws.frames`.

from libc.stdint cimport uint32_t

from fastws._picows cimport WSFrame, WSTransport


cdef enum NoResult:
    EXC = -1
    SUCCESS = 0


cdef class MessageAssembler:
    cdef:
        public Py_ssize_t max_message_size     #: limit over all fragments, else 1009 (SIGHUP sets it)
        readonly int reply_close_code          #: code to answer a peer CLOSE with (0: none yet)
        int _msg_type                          # opcode of the open fragmented message, 0: none
        uint32_t _utf8_state                   # DFA state carried across TEXT fragments
        bint _closed                           # a CLOSE was fed: ignore everything after it
        bytearray _buf                         # fragments so far (amortized O(n) growth)
        public bint deflate                    #: permessage-deflate negotiated: RSV1 = compressed
        object _inflater                       # zlib decompressobj of the open compressed message

    cpdef object feed(self, WSFrame frame)
    cpdef reset(self)
    cdef inline NoResult _check_close(self, WSFrame frame) except NoResult.EXC
    cdef inline object _continue(self, WSFrame frame)
    cdef object _compressed(self, WSFrame frame, int op)


cpdef bint utf8_valid(const unsigned char[:] data) noexcept
cpdef bint close_code_valid(int code) noexcept
cpdef object receive(MessageAssembler assembler, WSTransport transport, WSFrame frame)
cpdef close_with(WSTransport transport, int code, str reason=*, bint linger=*)
