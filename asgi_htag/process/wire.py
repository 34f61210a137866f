"""Length-prefixed JSON frames, the only thing that crosses a Unix socket in asgi_htag.

A frame is a 4-byte big-endian unsigned length followed by that many bytes of UTF-8 JSON
whose top level is an object. Readers refuse a length above their limit *before* reading
the payload, so a hostile or broken peer cannot make anyone buffer more than the limit.
"""
import json
import struct
from typing import Any, Dict, Optional, Tuple

from ..exceptions import FrameTooLarge, ProtocolError

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def encode(obj: Dict[str, Any], max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, raw: Optional[bytes] = None) -> bytes:
    """Serialize ``obj`` to one frame, with ``raw`` bytes after it if given.

    ``raw`` carries what a page sent, or what a page will receive, untouched: the worker
    relays it without parsing or re-encoding it. It follows the JSON object after a newline,
    which compact JSON never contains.

    Raises:
        FrameTooLarge: the encoded payload is larger than ``max_frame_bytes``.
        TypeError: ``obj`` holds something JSON cannot represent.
    """
    payload = _dumps(obj).encode()
    if raw is not None:
        payload += b"\n" + raw
    if len(payload) > max_frame_bytes:
        raise FrameTooLarge(f"frame of {len(payload)} bytes exceeds the limit of {max_frame_bytes}")
    return HEADER.pack(len(payload)) + payload


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
        obj = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"frame is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError(f"frame must be a JSON object, not {type(obj).__name__}")
    return obj


def split_payload(payload: bytes) -> Tuple[Dict[str, Any], Optional[bytes]]:
    """``(the JSON object, the raw bytes after it or None)`` of a frame payload."""
    meta, sep, raw = payload.partition(b"\n")
    return decode_payload(meta), (raw if sep else None)


class FrameBuffer:
    """Incremental decoder for a non-blocking reader: feed bytes, take whole frames."""

    __slots__ = ("_buf", "_max")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_frame_bytes

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_frame(self) -> Optional[Dict[str, Any]]:
        """The next complete frame, or None if more bytes are needed.

        Raises:
            ProtocolError: the buffered bytes cannot be a valid frame.
        """
        if len(self._buf) < HEADER_SIZE:
            return None
        length = decode_length(bytes(self._buf[:HEADER_SIZE]), self._max)
        end = HEADER_SIZE + length
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[HEADER_SIZE:end])
        del self._buf[:end]
        return split_payload(payload)[0]


__all__ = ("encode", "decode_length", "decode_payload", "split_payload", "FrameBuffer", "DEFAULT_MAX_FRAME_BYTES", "HEADER_SIZE")
