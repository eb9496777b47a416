# The picows C API fastws reaches, in one place (picows.pxd of picows 2.3.1).
#
# picows is pinned to 2.3.1 in pyproject.toml (`picows==2.3.1`, build and run time):
# the compiled hot path uses more than picows' documented Python API, so a new picows
# release must be checked before the pin moves.  What we reach, and where:
#
#   WSListener            Conn (_fanout.pyx) derives from it: the hub's connection is the
#                         picows listener, so a delivery is a C call, no Python dispatch
#   WSTransport._fast_write(char*, n)
#                         the hub writes each connection's queued frames in one call
#                         (cdef; builds no frame: ours are pre-built)
#   WSTransport.is_disconnected, is_close_frame_sent
#                         skip writes to a connection that is closing
#   WSTransport.request, response, listener_proxy, _write_buffer, disconnected_future, _loop
#                         _trim_transport (_fanout.pyx) drops or shares them per connection
#                         (~2.7 KB of an idle connection); tests/test_loadtest_memory.py
#                         checks these fields, so an upgrade that moves them fails there
#   MemoryBuffer          the one write buffer shared by every transport of a loop
#   WSFrame, WSMsgType, WSCloseCode
#                         _frames.pyx reads frames (RSV bits, fragments, UTF-8) and writes
#                         close frames
#
# Every other module that knows picows is the WebSocket adapter (fastws/server.py),
# echo mode (fastws/echo.py) and the client (fastws/client/).

from picows.picows cimport (
    MemoryBuffer,
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
)
