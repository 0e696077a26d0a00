"""selectserver: scriptable, misbehaving TCP servers for tests, all on one reactor thread.

from selectserver import CommandServer, RECEIVE
with CommandServer([RECEIVE, "HTTP/1.0 200 OK\\r\\n\\r\\nhello"]) as srv:
    requests.get(srv.url)
assert b"GET" in b"".join(srv.received)
"""

from ._control import GateControl, Parked
from ._faults import (
    Bandwidth,
    Fault,
    FaultHandle,
    Hold,
    Latency,
    LimitData,
    ResetPeer,
    Slicer,
    SlowClose,
    Timeout,
)
from ._proxy import FaultProxy
from ._reactor import Reactor, ReactorStatistics, statistics, stop_reactor
from ._recording import Chunk, ProxyRecord, load_recording
from ._records import ConnectionRecord, Outcome
from ._script import (
    BREAK,
    CLOSE,
    HALF_CLOSE,
    HANGUP,
    RECEIVE,
    RESET,
    STALL,
    TRUNCATE,
    Command,
    Delay,
    Drip,
    Expect,
    Garbage,
    Gate,
    ReadUntil,
    ReceiveCondition,
    Repeat,
    Reply,
    ReplyContext,
    SendRaw,
    StartTLS,
    Throttle,
    compile_script,
)
from ._servers import (
    DEFAULT_TIMEOUT,
    AsyncioCommandServer,
    BlackholeServer,
    CommandServer,
    OneShotServer,
    RefusingServer,
)

__version__ = "0.1.0"

__all__ = [
    "BREAK",
    "Bandwidth",
    "Chunk",
    "Fault",
    "FaultHandle",
    "FaultProxy",
    "Hold",
    "Latency",
    "LimitData",
    "ProxyRecord",
    "ResetPeer",
    "Slicer",
    "SlowClose",
    "Timeout",
    "load_recording",
    "CLOSE",
    "DEFAULT_TIMEOUT",
    "HALF_CLOSE",
    "HANGUP",
    "RECEIVE",
    "RESET",
    "STALL",
    "TRUNCATE",
    "AsyncioCommandServer",
    "BlackholeServer",
    "Command",
    "CommandServer",
    "ConnectionRecord",
    "Delay",
    "Drip",
    "Expect",
    "Garbage",
    "Gate",
    "GateControl",
    "OneShotServer",
    "Outcome",
    "Parked",
    "Reactor",
    "ReactorStatistics",
    "ReadUntil",
    "ReceiveCondition",
    "RefusingServer",
    "Repeat",
    "Reply",
    "ReplyContext",
    "SendRaw",
    "StartTLS",
    "Throttle",
    "compile_script",
    "statistics",
    "stop_reactor",
]
