"""Length-prefixed JSON frames, the only thing that crosses a Unix socket in asgi_htag.

A frame is a 4-byte big-endian unsigned length followed by that many bytes of UTF-8 JSON
whose top level is an object. Readers refuse a length above their limit *before* reading
the payload, so a hostile or broken peer cannot make anyone buffer more than the limit.
"""
import asyncio
import json
import os
import struct
from typing import Any, Dict, List, Optional, Tuple

from ..exceptions import FrameTooLarge, ProtocolError

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

# The meta of most frames a session process sends: a click's answer that changed nothing
# in the session. Written and recognised as these bytes, not encoded and parsed each time.
ACTIONS_META = b'{"t":"actions","diff":null}'
_ACTIONS = {"t": "actions", "diff": None}


def encode(obj: Dict[str, Any], max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, raw: Optional[bytes] = None) -> bytes:
    """Serialize ``obj`` to one frame, with ``raw`` bytes after it if given.

    ``raw`` carries what a page sent, or what a page will receive, untouched: the worker
    relays it without parsing or re-encoding it. It follows the JSON object after a newline,
    which compact JSON never contains.

    Raises:
        FrameTooLarge: the encoded payload is larger than ``max_frame_bytes``.
        TypeError: ``obj`` holds something JSON cannot represent.
    """
    return encode_json(ACTIONS_META if obj == _ACTIONS else _dumps(obj).encode(), max_frame_bytes, raw)


def encode_json(meta: bytes, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, raw: Optional[bytes] = None) -> bytes:
    """:func:`encode` of an object already serialized: ``meta`` is its compact JSON (as
    :func:`encode` writes it), so that a frame sent again and again is encoded once.

    Raises:
        FrameTooLarge: the payload is larger than ``max_frame_bytes``.
    """
    payload = meta if raw is None else b"%b\n%b" % (meta, raw)
    if len(payload) > max_frame_bytes:
        raise FrameTooLarge(f"frame of {len(payload)} bytes exceeds the limit of {max_frame_bytes}")
    return HEADER.pack(len(payload)) + payload


def compact_json(obj: Dict[str, Any]) -> bytes:
    """``obj`` as :func:`encode` serializes it, for :func:`encode_json`."""
    return _dumps(obj).encode()


# Beside each session process's socket (KEY.s), its busy mark (KEY.busy): 8 bytes, the
# CLOCK_MONOTONIC time at which its running interaction (or render) started, 0 when none
# runs. The process writes it in place (pwrite); the worker's watchdog reads it to
# tell a click queued behind others' (the process is busy, under its own timer) from a
# process stuck outside any interaction or past its limit. The byte after it, CONTACTED,
# is written once, when the page first makes contact (its websocket, or an interaction):
# the fork server, full, ends the oldest process whose page never did (see Zygote).
BUSY = struct.Struct("=d")
CONTACT_OFFSET = BUSY.size
CONTACTED = b"\x01"
# Then, until contact, the CLOCK_MONOTONIC time of the page's latest render: a page handed
# out again (a reload) has its full delay to make contact from then on.
RENDERED = struct.Struct("=d")
RENDERED_OFFSET = CONTACT_OFFSET + 1


# The one frame a fork server sends on a worker's presence connection after its hello
# reply: it is stopping by plan (new app code, its runtime dir removed), for ``reason``.
RETIRING = "retiring"


def busy_path(sock_path: str) -> str:
    """The busy mark of the process whose socket is ``sock_path``."""
    return os.path.splitext(sock_path)[0] + ".busy"


def read_busy(sock_path: str) -> Optional[float]:
    """Since when the process of ``sock_path`` runs an interaction (0.0: none), or None if
    it has no readable mark."""
    try:
        with open(busy_path(sock_path), "rb") as f:
            data = f.read(BUSY.size)
    except OSError:
        return None
    return BUSY.unpack(data)[0] if len(data) == BUSY.size else None


def read_contact(sock_path: str) -> Tuple[bool, float]:
    """``(whether the page of the process of sock_path made contact, when it was last
    rendered (0.0: never))``, from its busy mark (see BUSY). A mark that cannot be read
    reads as contact made: a process that cannot be judged is not ended for it."""
    try:
        with open(busy_path(sock_path), "rb") as f:
            f.seek(CONTACT_OFFSET)
            data = f.read(1 + RENDERED.size)
    except OSError:
        return True, 0.0
    if data[:1] != b"\x00":
        return True, 0.0
    rendered = RENDERED.unpack(data[1:])[0] if len(data) == 1 + RENDERED.size else 0.0
    return False, rendered


_scan_once = json.JSONDecoder().scan_once


def loads(data: bytes) -> Any:
    """``json.loads(data)``: the same value or the same error, for less CPU when ``data``
    is a JSON object with nothing around it, as every frame and interaction is.
    ``json.loads`` spends more on its per-call checks (text encoding, whitespace) than on
    parsing such a small object; anything else goes through it.

    Raises:
        ValueError: not JSON (``json.JSONDecodeError``), not UTF-8 (``UnicodeDecodeError``),
            or nested deeper than the interpreter's recursion limit (which ``json.loads``
            reports as a RecursionError).
    """
    try:
        if data[:1] == b"{":
            text = data.decode("utf-8")  # what json.loads decodes a BOM-less object with
            try:
                obj, end = _scan_once(text, 0)
            except StopIteration:  # not a value at all: json.loads says so in its own words
                return json.loads(data)
            if end == len(text):
                return obj
        return json.loads(data)  # whitespace or something after the value: its errors, or its value
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def decode_length(header: bytes, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> int:
    """The payload length announced by a 4-byte header, checked against the limit."""
    if len(header) != HEADER_SIZE:
        raise ProtocolError(f"truncated frame header ({len(header)} bytes)")
    (length,) = HEADER.unpack(header)
    if length > max_frame_bytes:
        raise FrameTooLarge(f"peer announced a frame of {length} bytes (limit {max_frame_bytes})")
    return length


def decode_payload(payload: bytes) -> Dict[str, Any]:
    """Parse a frame payload; it must be a JSON object."""
    try:
        obj = loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"frame is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError(f"frame must be a JSON object, not {type(obj).__name__}")
    return obj


def split_payload(payload: bytes) -> Tuple[Dict[str, Any], Optional[bytes]]:
    """``(the JSON object, the raw bytes after it or None)`` of a frame payload."""
    meta, sep, raw = payload.partition(b"\n")
    if meta == ACTIONS_META:  # most answers: no JSON to parse
        return {"t": "actions", "diff": None}, (raw if sep else None)
    return decode_payload(meta), (raw if sep else None)


class FrameBuffer:
    """Incremental decoder for a non-blocking reader: feed bytes, take whole frames."""

    __slots__ = ("_buf", "_max")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_frame_bytes

    def __len__(self) -> int:
        """Bytes buffered, whole frames or not."""
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        self._buf += data

    def clear(self) -> None:
        self._buf.clear()

    def next_payload(self) -> Optional[bytes]:
        """The payload of the next complete frame, or None if more bytes are needed.

        Raises:
            ProtocolError: the buffered bytes cannot be a valid frame (an announced length
                above the limit is refused before its payload is waited for).
        """
        buf = self._buf
        if len(buf) < HEADER_SIZE:
            return None
        end = HEADER_SIZE + decode_length(bytes(buf[:HEADER_SIZE]), self._max)
        if len(buf) < end:
            return None
        payload = bytes(buf[HEADER_SIZE:end])
        del buf[:end]
        return payload

    def next_frame(self) -> Optional[Dict[str, Any]]:
        """The JSON object of the next complete frame, or None if more bytes are needed.

        Raises:
            ProtocolError: the buffered bytes cannot be a valid frame.
        """
        payload = self.next_payload()
        return None if payload is None else split_payload(payload)[0]


class FlowProtocol(asyncio.Protocol):
    """Flow control of one connection, both ways: the base of the protocols at both ends
    of a worker <-> session-process connection.

    Writing: ``drain()`` waits while the transport asks us to stop writing; every task
    waiting there is woken when it may go on, and told (ConnectionResetError) when the
    connection is gone. Reading: a subclass's ``data_received`` keeps what arrives and
    counts it with :meth:`_hold`; reading pauses while more than ``PAUSE_ABOVE`` bytes are
    held and resumes when the reader, which says what it took with :meth:`release`, has
    brought that down to half. The one reading task waits in :meth:`readable`, woken by
    new data, the end of the stream (``eof``) or the loss of the connection."""

    PAUSE_ABOVE = 4 * 1024 * 1024

    def __init__(self) -> None:
        self.transport: Optional[asyncio.Transport] = None
        self.lost = False
        self.eof = False  # nothing more will arrive
        self.write_paused = False
        self.reading_paused = False
        self.held = 0
        self._drain_waiters: "List[asyncio.Future[None]]" = []
        self._reader: "Optional[asyncio.Future[None]]" = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def eof_received(self) -> Optional[bool]:
        self.eof = True
        self._wake_reader()
        return False

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.eof = True
        self.lost = True
        self._wake_reader()
        self._wake_drainers()

    # --- reading ----------------------------------------------------------------------
    def _hold(self, size: int) -> None:
        """``size`` more bytes kept for the reader; wakes it."""
        self.held += size
        if self.held > self.PAUSE_ABOVE and not self.reading_paused and self.transport is not None:
            self.transport.pause_reading()
            self.reading_paused = True
        self._wake_reader()

    def release(self, size: int) -> None:
        """The reader took ``size`` of the bytes held."""
        self.held -= size
        if self.reading_paused and self.held <= self.PAUSE_ABOVE // 2 and self.transport is not None and not self.lost:
            self.reading_paused = False
            self.transport.resume_reading()

    async def readable(self) -> None:
        """Wait until data arrives or the stream ends (check ``eof`` afterwards)."""
        self._reader = asyncio.get_running_loop().create_future()
        try:
            await self._reader
        finally:
            self._reader = None

    def _wake_reader(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    # --- writing ----------------------------------------------------------------------
    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_drainers()

    def _wake_drainers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def drain(self) -> None:
        while self.write_paused and not self.lost:
            fut: "asyncio.Future[None]" = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(fut)
            await fut
        if self.lost:
            raise ConnectionResetError("the peer closed the connection")


__all__ = ("encode", "loads", "encode_json", "compact_json", "ACTIONS_META", "RETIRING", "decode_length", "decode_payload", "split_payload", "FrameBuffer", "FlowProtocol", "DEFAULT_MAX_FRAME_BYTES", "HEADER_SIZE")
