"""'parano' mode: every interaction and push payload AES-256-GCM encrypted.

The key is agreed per page with ECDH on P-256: the page makes a key pair with WebCrypto and
sends its public key; the per-session process answers with its own; both derive the same
AES key with HKDF-SHA256 (salt: the page's token). Nothing secret is ever printed into the
page. Each direction has its own associated data, so a frame cannot be reflected back, and
both ends number what they send (``{"n": seq, "o": payload}`` inside the envelope), so an
old frame cannot be replayed to either. The agreement itself is not authenticated: parano
keeps the payloads from whoever only sees the traffic (a proxy that logs, a TLS
terminator), not from one who rewrites it from the page's first frame on.

Envelope (base64 of): 12-byte nonce || ciphertext || 16-byte GCM tag.
"""
import base64
import binascii
import json
from typing import Any, Dict, Tuple

from Crypto.Cipher import AES
from Crypto.Hash import SHA256
from Crypto.Protocol.DH import key_agreement
from Crypto.Protocol.KDF import HKDF
from Crypto.PublicKey import ECC
from Crypto.Random import get_random_bytes

from .exceptions import ProtocolError

INFO = b"asgi_htag parano v1"
AAD_TO_SERVER = b"asgi_htag c2s"
AAD_TO_PAGE = b"asgi_htag s2c"
MAX_ENVELOPE_CHARS = 16 * 1024 * 1024


class PageKey:
    """The AES key of one page, the replay counter of what that page sent, and the number
of what was sent to it."""

    __slots__ = ("_key", "last_seq", "sent_seq")

    def __init__(self, key: bytes) -> None:
        self._key = key
        self.last_seq = 0
        self.sent_seq = 0

    def __repr__(self) -> str:
        return "PageKey(<hidden>)"

    @classmethod
    def agree(cls, page_public_b64: str, salt: bytes) -> Tuple["PageKey", str]:
        """ECDH with the page's public key (base64 of the 65-byte uncompressed point).
        Returns the key and our public key (same encoding) for the page.

        Raises:
            ProtocolError: the page's public key is not a valid P-256 point.
        """
        ours = ECC.generate(curve="P-256")
        try:
            raw = base64.b64decode(page_public_b64, validate=True)
            peer = ECC.import_key(raw, curve_name="P-256")
            z = key_agreement(static_priv=ours, static_pub=peer, kdf=lambda x: x)
        except (ValueError, TypeError, binascii.Error) as exc:
            raise ProtocolError("invalid public key") from exc
        key = HKDF(z, 32, salt, SHA256, context=INFO)
        pub = base64.b64encode(ours.public_key().export_key(format="raw")).decode()
        return cls(key), pub  # type: ignore[arg-type]

    def seal(self, obj: Any) -> str:
        """Encrypt ``obj`` (JSON) for the page, numbered: the page refuses a number twice."""
        self.sent_seq += 1
        nonce = get_random_bytes(12)
        cipher = AES.new(self._key, AES.MODE_GCM, nonce=nonce)
        cipher.update(AAD_TO_PAGE)
        ct, tag = cipher.encrypt_and_digest(json.dumps({"n": self.sent_seq, "o": obj}, separators=(",", ":")).encode())
        return base64.b64encode(nonce + ct + tag).decode()

    def open(self, envelope: Any) -> Dict[str, Any]:
        """Decrypt a frame from the page and check its sequence number; returns the
        interaction it carries.

        Raises:
            ProtocolError: not an envelope, not ours, tampered, or replayed.
        """
        if not isinstance(envelope, str) or len(envelope) > MAX_ENVELOPE_CHARS:
            raise ProtocolError("encrypted payload expected")
        try:
            blob = base64.b64decode(envelope, validate=True)
        except (ValueError, binascii.Error) as exc:
            raise ProtocolError("encrypted payload is not base64") from exc
        if len(blob) < 12 + 16:
            raise ProtocolError("encrypted payload too short")
        cipher = AES.new(self._key, AES.MODE_GCM, nonce=blob[:12])
        cipher.update(AAD_TO_SERVER)
        try:
            plain = cipher.decrypt_and_verify(blob[12:-16], blob[-16:])
            msg = json.loads(plain)
        except ValueError as exc:
            raise ProtocolError("encrypted payload failed authentication") from exc
        if not isinstance(msg, dict) or not isinstance(msg.get("n"), int) or not isinstance(msg.get("o"), dict):
            raise ProtocolError("encrypted payload has the wrong shape")
        if msg["n"] <= self.last_seq:
            raise ProtocolError("replayed or reordered payload")
        self.last_seq = msg["n"]
        return msg["o"]


__all__ = ("PageKey",)
