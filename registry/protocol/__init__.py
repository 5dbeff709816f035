"""Sans-IO wire protocol between registry clients and nodes.

Three layers, each usable alone: ``frames`` (length-prefixed msgpack maps),
``messages`` (typed events and their wire maps) and ``connection`` (the
client and server state machines the asyncio shells drive).  Nothing in this
package does I/O, uses asyncio or threads, or reads a clock.
"""

from registry.protocol.connection import CLOSED, NEED_DATA, ClientConnection, Closed, NeedData, ServerConnection
from registry.protocol.frames import FRAME_BYTES_MAX_DEFAULT, NESTING_DEPTH_MAX, FrameDecoder, encode_frame
from registry.protocol.messages import (
    CLIENT_NAME_CHARS_MAX,
    OP_NAME_CHARS_MAX,
    PROTOCOL_VERSION,
    REQUEST_ID_MAX,
    STREAMS_PER_CONNECTION_MAX,
    TOKEN_CHARS_MAX,
    BadMessage,
    Bye,
    Cancel,
    ClientMessage,
    Hello,
    HelloOk,
    Request,
    Response,
    ServerMessage,
    StreamEnd,
    StreamEvent,
)

__all__ = [
    # connections
    "ServerConnection",
    "ClientConnection",
    "NEED_DATA",
    "CLOSED",
    "NeedData",
    "Closed",
    # messages
    "PROTOCOL_VERSION",
    "Hello",
    "Request",
    "Cancel",
    "HelloOk",
    "Response",
    "StreamEvent",
    "StreamEnd",
    "Bye",
    "BadMessage",
    "ClientMessage",
    "ServerMessage",
    # framing
    "FrameDecoder",
    "encode_frame",
    # limits
    "FRAME_BYTES_MAX_DEFAULT",
    "NESTING_DEPTH_MAX",
    "OP_NAME_CHARS_MAX",
    "REQUEST_ID_MAX",
    "TOKEN_CHARS_MAX",
    "CLIENT_NAME_CHARS_MAX",
    "STREAMS_PER_CONNECTION_MAX",
]
