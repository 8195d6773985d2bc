"""WebSocket framing (RFC 6455), sans-IO: the hub's side of a connection, and the client's.

The hub speaks WebSocket without extensions, so after the opening handshake (done by
wsproto, in `_websocket.py`) the frames are simple enough to parse in a few lines, and
doing it here instead of through a general-purpose library is the largest saving on the
hub's hot path: one pass over the received bytes yields whole messages, with no event
objects and no per-frame state machine.

`FrameReader` takes bytes a client sent and returns messages; the module-level functions
build the frames the hub sends. The client's side (the SDK's connection, in
`_client_websocket.py`) is beside it: `ClientFrameReader` reads the unmasked frames a
server sends, `Masker` builds the masked frames a client sends.

A peer that breaks the protocol gets `FrameError`, whose `code` is the close code to
answer with: 1002 (protocol error), 1007 (text that is not UTF-8) or 1009 (a message over
the size limit, refused as soon as its header says so). A length not in its shortest
form, or a 64-bit length with its top bit set, is a 1002.
No trio here: the Trio layer moves the bytes.
"""

from __future__ import annotations

import os
import struct

__all__ = [
    "BINARY",
    "CLOSE",
    "PING",
    "PONG",
    "TEXT",
    "ClientFrameReader",
    "FrameError",
    "FrameReader",
    "Masker",
    "close_frame",
    "encode_frame",
    "parse_close",
]

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_DATA = frozenset({CONTINUATION, TEXT, BINARY})
_CONTROL = frozenset({CLOSE, PING, PONG})

PROTOCOL_ERROR = 1002
INVALID_DATA = 1007
TOO_BIG = 1009
# Close codes a peer may send (RFC 6455 section 7.4); 1005, 1006 and 1015 must not be sent.
_SENDABLE = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})

_from_bytes = int.from_bytes
_LEN16 = struct.Struct("!H")
_LEN64 = struct.Struct("!Q")
_HEAD16 = struct.Struct("!BBH")
_HEAD64 = struct.Struct("!BBQ")
_MASKED_HEAD16 = struct.Struct("!BBH4s")
_MASKED_HEAD64 = struct.Struct("!BBQ4s")


class FrameError(Exception):
    """The peer broke the WebSocket protocol; close the connection with `code`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class FrameReader:
    """Turns the bytes a client sends into messages.

    `receive(data)` returns a list of ``(opcode, payload)``: ``(TEXT, str)``,
    ``(BINARY, bytes)``, and the control frames ``(PING | PONG | CLOSE, bytes)``, in the
    order they arrived. Fragmented messages are joined; a frame cut across two reads is
    kept until the rest arrives. A close frame is the last one read: the bytes after it
    are ignored (RFC 6455 section 5.5.1), and so is everything received later. After a
    `FrameError` the reader must not be used again.
    """

    def __init__(self, max_message_size: int) -> None:
        self.max_message_size = max_message_size
        self._pending = bytearray()  # the start of a frame whose end has not arrived yet
        self._parts: list[bytes] = []  # the frames so far of a fragmented message
        self._parts_opcode = 0  # TEXT or BINARY while a fragmented message is open
        self._parts_size = 0
        self.closed = False  # a close frame arrived: nothing after it is read
        self.buffered = 0  # bytes held of a message not yet whole (a cut frame, fragments)

    def receive(self, data: bytes | bytearray) -> list[tuple[int, str | bytes]]:
        if self.closed:
            return []
        buf = data
        if self._pending:  # grows in place while a large frame trickles in
            self._pending += data
            buf = self._pending
        end = len(buf)
        pos = 0
        out: list[tuple[int, str | bytes]] = []
        limit = self.max_message_size
        unfragmented = not self._parts_opcode  # no fragmented message is open
        while end - pos >= 2:
            first, second = buf[pos], buf[pos + 1]
            if first == 0x81 and 0x80 < second < 0xFE and unfragmented and second - 0x80 <= limit:
                # The common case, inline: a whole, masked text frame of 1 to 125 bytes.
                head = pos + 6
                length = second - 0x80
                if end - head < length:
                    break
                pos = head + length
                key = _from_bytes(buf[head - 4 : head] * (length // 4 + 1), "little")
                unmasked = (_from_bytes(buf[head:pos], "little") ^ key) & ((1 << (8 * length)) - 1)
                try:
                    out.append((TEXT, unmasked.to_bytes(length, "little").decode()))
                except UnicodeDecodeError:
                    raise FrameError(INVALID_DATA, "text message is not valid UTF-8") from None
                continue
            if first & 0x70:
                raise FrameError(PROTOCOL_ERROR, "reserved bits set, but no extension agreed")
            if not second & 0x80:
                raise FrameError(PROTOCOL_ERROR, "a client's frames must be masked")
            opcode = first & 0x0F
            length = second & 0x7F
            head = pos + 6
            if length == 126:
                if end - pos < 8:
                    break
                (length,) = _LEN16.unpack_from(buf, pos + 2)
                head = pos + 8
                if length < 126:
                    raise FrameError(PROTOCOL_ERROR, "payload length not in its shortest form")
            elif length == 127:
                if end - pos < 14:
                    break
                (length,) = _LEN64.unpack_from(buf, pos + 2)
                head = pos + 14
                if length >> 63:
                    raise FrameError(PROTOCOL_ERROR, "64-bit payload length with the top bit set")
                if length < 1 << 16:
                    raise FrameError(PROTOCOL_ERROR, "payload length not in its shortest form")
            if opcode in _CONTROL:
                if length > 125 or not first & 0x80:
                    raise FrameError(PROTOCOL_ERROR, "control frames must be whole and short")
            elif opcode not in _DATA:
                raise FrameError(PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
            elif length + self._parts_size > limit:
                raise FrameError(TOO_BIG, f"message over the {limit}-byte limit")
            if end - head < length:
                break
            payload = _unmask(buf[head - 4 : head], buf[head : head + length])
            pos = head + length
            if opcode == TEXT and first & 0x80 and not self._parts_opcode:
                out.append((TEXT, _text(payload)))  # a whole text frame, a longer one
            elif opcode in _CONTROL:
                out.append((opcode, payload))
                if opcode == CLOSE:  # the peer's last frame: what follows is ignored
                    self.closed = True
                    self._pending = bytearray()
                    self._parts, self._parts_opcode, self._parts_size = [], 0, 0
                    self.buffered = 0
                    return out
            else:
                message = self._fragment(opcode, bool(first & 0x80), payload)
                if message is not None:
                    out.append(message)
                unfragmented = not self._parts_opcode
        if buf is self._pending:
            del self._pending[:pos]
        elif pos < end:
            self._pending = bytearray(buf[pos:])
        self.buffered = len(self._pending) + self._parts_size
        return out

    def _fragment(self, opcode: int, fin: bool, payload: bytes) -> tuple[int, str | bytes] | None:
        """Add one data frame to the message being put together; return it once whole."""
        if opcode == CONTINUATION:
            if not self._parts_opcode:
                raise FrameError(PROTOCOL_ERROR, "continuation frame with no message to continue")
        elif self._parts_opcode:
            raise FrameError(PROTOCOL_ERROR, "new message before the last one was finished")
        else:
            self._parts_opcode = opcode
        self._parts.append(payload)
        self._parts_size += len(payload)
        if not fin:
            return None
        opcode, whole = self._parts_opcode, b"".join(self._parts)
        self._parts, self._parts_opcode, self._parts_size = [], 0, 0
        return (TEXT, _text(whole)) if opcode == TEXT else (BINARY, whole)


class ClientFrameReader(FrameReader):
    """The client's side: turns the bytes a server sends into messages, as `FrameReader`
    does for a client's (the same results, limits and errors), except that a server's
    frames must not be masked (RFC 6455 section 5.1)."""

    def receive(self, data: bytes | bytearray) -> list[tuple[int, str | bytes]]:
        if self.closed:
            return []
        buf = data
        if self._pending:
            self._pending += data
            buf = self._pending
        end = len(buf)
        pos = 0
        out: list[tuple[int, str | bytes]] = []
        limit = self.max_message_size
        while end - pos >= 2:
            first, second = buf[pos], buf[pos + 1]
            if first & 0x70:
                raise FrameError(PROTOCOL_ERROR, "reserved bits set, but no extension agreed")
            if second & 0x80:
                raise FrameError(PROTOCOL_ERROR, "a server's frames must not be masked")
            opcode = first & 0x0F
            length = second
            head = pos + 2
            if length == 126:
                if end - pos < 4:
                    break
                (length,) = _LEN16.unpack_from(buf, pos + 2)
                head = pos + 4
                if length < 126:
                    raise FrameError(PROTOCOL_ERROR, "payload length not in its shortest form")
            elif length == 127:
                if end - pos < 10:
                    break
                (length,) = _LEN64.unpack_from(buf, pos + 2)
                head = pos + 10
                if length >> 63:
                    raise FrameError(PROTOCOL_ERROR, "64-bit payload length with the top bit set")
                if length < 1 << 16:
                    raise FrameError(PROTOCOL_ERROR, "payload length not in its shortest form")
            if opcode in _CONTROL:
                if length > 125 or not first & 0x80:
                    raise FrameError(PROTOCOL_ERROR, "control frames must be whole and short")
            elif opcode not in _DATA:
                raise FrameError(PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
            elif length + self._parts_size > limit:
                raise FrameError(TOO_BIG, f"message over the {limit}-byte limit")
            if end - head < length:
                break
            pos = head + length
            payload = bytes(buf[head:pos])
            if opcode == TEXT and first & 0x80 and not self._parts_opcode:
                out.append((TEXT, _text(payload)))  # the common case: a whole text frame
            elif opcode in _CONTROL:
                out.append((opcode, payload))
                if opcode == CLOSE:  # the peer's last frame: what follows is ignored
                    self.closed = True
                    self._pending = bytearray()
                    self._parts, self._parts_opcode, self._parts_size = [], 0, 0
                    self.buffered = 0
                    return out
            else:
                message = self._fragment(opcode, bool(first & 0x80), payload)
                if message is not None:
                    out.append(message)
        if buf is self._pending:
            del self._pending[:pos]
        elif pos < end:
            self._pending = bytearray(buf[pos:])
        self.buffered = len(self._pending) + self._parts_size
        return out


class Masker:
    """Builds the frames a client sends: whole, and masked with a fresh key each (RFC
    6455 section 5.3), the keys drawn from `os.urandom` a few hundred at a time."""

    _KEYS = 4096  # bytes of keys drawn at once: 1,024 frames

    def __init__(self) -> None:
        self._keys = b""
        self._next = 0

    def _key(self) -> bytes:
        start = self._next
        if start >= len(self._keys):
            self._keys, start = os.urandom(self._KEYS), 0
        self._next = start + 4
        return self._keys[start : start + 4]

    def frame(self, opcode: int, payload: bytes) -> bytes:
        """One whole frame of `payload`, masked."""
        mask = self._key()
        n = len(payload)
        if n < 126:
            head = bytes((0x80 | opcode, 0x80 | n)) + mask
        elif n < 1 << 16:
            head = _MASKED_HEAD16.pack(0x80 | opcode, 0x80 | 126, n, mask)
        else:
            head = _MASKED_HEAD64.pack(0x80 | opcode, 0x80 | 127, n, mask)
        return head + _unmask(mask, payload)  # masking and unmasking are the same XOR

    def close(self, code: int, reason: str = "") -> bytes:
        """A masked close frame; the reason is cut to fit, as in `close_frame`."""
        data = reason.encode()[:123].decode(errors="ignore").encode()
        return self.frame(CLOSE, code.to_bytes(2, "big") + data)


def _unmask(mask: bytes | bytearray, payload: bytes | bytearray) -> bytes:
    n = len(payload)
    if not n:
        return b""
    key = int.from_bytes(mask * (n // 4 + 1), "little") & ((1 << (8 * n)) - 1)
    return (int.from_bytes(payload, "little") ^ key).to_bytes(n, "little")


def _text(payload: bytes) -> str:
    try:
        return payload.decode()
    except UnicodeDecodeError:
        raise FrameError(INVALID_DATA, "text message is not valid UTF-8") from None


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One whole, unmasked frame (the hub's frames are never masked)."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 1 << 16:
        return _HEAD16.pack(0x80 | opcode, 126, n) + payload
    return _HEAD64.pack(0x80 | opcode, 127, n) + payload


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame; the reason is cut to fit the 125-byte limit of control frames."""
    data = reason.encode()[:123].decode(errors="ignore").encode()
    return encode_frame(CLOSE, code.to_bytes(2, "big") + data)


def parse_close(payload: bytes) -> tuple[int, str]:
    """The code and reason of a close frame the peer sent (1005 when it gave no code)."""
    if not payload:
        return 1005, ""
    if len(payload) == 1:
        raise FrameError(PROTOCOL_ERROR, "close frame with a one-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if code not in _SENDABLE and not 3000 <= code <= 4999:
        raise FrameError(PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        return code, payload[2:].decode()
    except UnicodeDecodeError:
        raise FrameError(INVALID_DATA, "close reason is not valid UTF-8") from None
