"""SPDY/3.1 framing (sans-IO) for the sandbox's port-forward tunnel.

kubectl >= 1.31 port-forwards over a WebSocket whose subprotocol is ``SPDY/3.1+portforward.k8s.io``: the
WebSocket binary messages carry a byte stream of SPDY/3.1 frames (message boundaries are arbitrary), exactly
what kubectl would otherwise speak over an upgraded ``POST`` connection. This module parses and builds those
frames; it does no I/O so it can be driven by any transport (and by tests acting as the client side).

Wire layout (draft-3.1, as implemented by moby/spdystream which client-go uses):

* control frame: ``1 | version(15) = 3 | type(16) | flags(8) | length(24) | payload``
* data frame:    ``0 | stream-id(31) | flags(8) | length(24) | payload``
* header blocks (SYN_STREAM, SYN_REPLY, HEADERS) are ``u32 count`` then ``u32 len, name, u32 len, value``
  pairs (multiple values NUL-separated, names lowercase), zlib-compressed with ONE stream per direction
  for the whole session, primed with the SPDY/3 dictionary and SYNC_FLUSHed after every block.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

SPDY3_DICTIONARY = (
    b"\x00\x00\x00\x07options\x00\x00\x00\x04head\x00\x00\x00\x04p"
    b"ost\x00\x00\x00\x03put\x00\x00\x00\x06delete\x00\x00\x00\x05trac"
    b"e\x00\x00\x00\x06accept\x00\x00\x00\x0eaccept-charset\x00\x00\x00"
    b"\x0faccept-encoding\x00\x00\x00\x0faccept-language\x00\x00\x00\ra"
    b"ccept-ranges\x00\x00\x00\x03age\x00\x00\x00\x05allow\x00\x00\x00\r"
    b"authorization\x00\x00\x00\rcache-control\x00\x00\x00\nconnection"
    b"\x00\x00\x00\x0ccontent-base\x00\x00\x00\x10content-encoding"
    b"\x00\x00\x00\x10content-language\x00\x00\x00\x0econtent-leng"
    b"th\x00\x00\x00\x10content-location\x00\x00\x00\x0bcontent-md"
    b"5\x00\x00\x00\rcontent-range\x00\x00\x00\x0ccontent-type\x00\x00"
    b"\x00\x04date\x00\x00\x00\x04etag\x00\x00\x00\x06expect"
    b"\x00\x00\x00\x07expires\x00\x00\x00\x04from\x00\x00\x00\x04h"
    b"ost\x00\x00\x00\x08if-match\x00\x00\x00\x11if-modified-since"
    b"\x00\x00\x00\rif-none-match\x00\x00\x00\x08if-range\x00\x00\x00"
    b"\x13if-unmodified-since\x00\x00\x00\rlast-modified\x00\x00\x00"
    b"\x08location\x00\x00\x00\x0cmax-forwards\x00\x00\x00\x06pragma\x00"
    b"\x00\x00\x12proxy-authenticate\x00\x00\x00\x13proxy-authorization"
    b"\x00\x00\x00\x05range\x00\x00\x00\x07referer\x00\x00\x00\x0bretr"
    b"y-after\x00\x00\x00\x06server\x00\x00\x00\x02te\x00\x00\x00\x07t"
    b"railer\x00\x00\x00\x11transfer-encoding\x00\x00\x00\x07upgra"
    b"de\x00\x00\x00\nuser-agent\x00\x00\x00\x04vary\x00\x00\x00\x03"
    b"via\x00\x00\x00\x07warning\x00\x00\x00\x10www-authenticate\x00\x00"
    b"\x00\x06method\x00\x00\x00\x03get\x00\x00\x00\x06statu"
    b"s\x00\x00\x00\x06200 OK\x00\x00\x00\x07version\x00\x00\x00\x08HT"
    b"TP/1.1\x00\x00\x00\x03url\x00\x00\x00\x06public\x00\x00\x00\nset-c"
    b"ookie\x00\x00\x00\nkeep-alive\x00\x00\x00\x06origin100101201202205"
    b"2063003023033043053063074024054064074084094104114124134144154164"
    b"17502504505203 Non-Authoritative Information204 No Content301 Mo"
    b"ved Permanently400 Bad Request401 Unauthorized403 Forbidden404 N"
    b"ot Found500 Internal Server Error501 Not Implemented503 Service "
    b"UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:0"
    b"0:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,ima"
    b"ge/png,image/jpg,image/gif,application/xml,application/xhtml+xml"
    b",text/plain,text/javascript,publicprivatemax-age=gzip,deflate,sd"
    b"chcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)


VERSION = 3

# Control frame types.
SYN_STREAM = 1
SYN_REPLY = 2
RST_STREAM = 3
SETTINGS = 4
PING = 6
GOAWAY = 7
HEADERS = 8
WINDOW_UPDATE = 9

FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02

# RST_STREAM status codes.
RST_PROTOCOL_ERROR = 1
RST_INVALID_STREAM = 2
RST_REFUSED_STREAM = 3
RST_CANCEL = 5
RST_INTERNAL_ERROR = 6

MAX_FRAME_PAYLOAD = (1 << 24) - 1
# A peer announcing a bigger frame than this is broken or hostile; nothing kubectl sends comes close.
MAX_ACCEPTED_FRAME = 1 << 24

Headers = dict[str, list[str]]


class SpdyProtocolError(Exception):
    """The byte stream is not valid SPDY/3.1; the session must be torn down (GOAWAY)."""


@dataclass
class DataFrame:
    stream_id: int
    flags: int
    data: bytes

    @property
    def fin(self) -> bool:
        return bool(self.flags & FLAG_FIN)


@dataclass
class ControlFrame:
    type: int
    flags: int
    stream_id: int = 0
    associated_id: int = 0
    priority: int = 0
    headers: Headers = field(default_factory=dict)
    status: int = 0  # RST_STREAM / GOAWAY status
    ping_id: int = 0
    delta: int = 0  # WINDOW_UPDATE
    settings: list[tuple[int, int, int]] = field(default_factory=list)  # (flags, id, value)

    @property
    def fin(self) -> bool:
        return bool(self.flags & FLAG_FIN)


Frame = DataFrame | ControlFrame


def encode_header_block(headers: Headers) -> bytes:
    parts = [struct.pack("!I", len(headers))]
    for name, values in headers.items():
        n = name.lower().encode()
        v = b"\x00".join(x.encode() for x in values)
        parts += [struct.pack("!I", len(n)), n, struct.pack("!I", len(v)), v]
    return b"".join(parts)


def decode_header_block(raw: bytes) -> Headers:
    try:
        (count,) = struct.unpack_from("!I", raw, 0)
        pos = 4
        out: Headers = {}
        for _ in range(count):
            (nlen,) = struct.unpack_from("!I", raw, pos)
            name = raw[pos + 4 : pos + 4 + nlen].decode()
            pos += 4 + nlen
            (vlen,) = struct.unpack_from("!I", raw, pos)
            value = raw[pos + 4 : pos + 4 + vlen].decode()
            pos += 4 + vlen
            if pos > len(raw):
                raise SpdyProtocolError("truncated header block")
            out.setdefault(name.lower(), []).extend(value.split("\x00"))
        return out
    except (struct.error, UnicodeDecodeError) as exc:
        raise SpdyProtocolError(f"bad header block: {exc}") from exc


class SpdyFramer:
    """Incremental parser + builder for one endpoint of a SPDY/3.1 session.

    The two zlib contexts (one per direction) live as long as the session: a header block can only be
    decompressed after every earlier one, so a framer must see every frame of its direction, in order.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._inflate = zlib.decompressobj(zdict=SPDY3_DICTIONARY)
        self._deflate = zlib.compressobj(9, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY, SPDY3_DICTIONARY)

    # ---- parsing -----------------------------------------------------------------------------------
    def feed(self, data: bytes) -> list[Frame]:
        """Add received bytes; return every complete frame now available."""
        self._buf += data
        frames: list[Frame] = []
        while len(self._buf) >= 8:
            flags = self._buf[4]
            length = int.from_bytes(self._buf[5:8], "big")
            if length > MAX_ACCEPTED_FRAME:
                raise SpdyProtocolError("frame too large")
            if len(self._buf) < 8 + length:
                break
            head = bytes(self._buf[:8])
            payload = bytes(self._buf[8 : 8 + length])
            del self._buf[: 8 + length]
            if head[0] & 0x80:
                version = int.from_bytes(head[0:2], "big") & 0x7FFF
                if version != VERSION:
                    raise SpdyProtocolError(f"unsupported SPDY version {version}")
                ftype = int.from_bytes(head[2:4], "big")
                frames.append(self._parse_control(ftype, flags, payload))
            else:
                stream_id = int.from_bytes(head[0:4], "big") & 0x7FFFFFFF
                frames.append(DataFrame(stream_id, flags, payload))
        return frames

    def _headers(self, block: bytes) -> Headers:
        try:
            raw = self._inflate.decompress(block)
        except zlib.error as exc:
            raise SpdyProtocolError(f"header decompression failed: {exc}") from exc
        return decode_header_block(raw)

    def _parse_control(self, ftype: int, flags: int, p: bytes) -> ControlFrame:
        try:
            if ftype == SYN_STREAM:
                sid, assoc = struct.unpack_from("!II", p, 0)
                return ControlFrame(
                    ftype,
                    flags,
                    stream_id=sid & 0x7FFFFFFF,
                    associated_id=assoc & 0x7FFFFFFF,
                    priority=p[8] >> 5,
                    headers=self._headers(p[10:]),
                )
            if ftype in (SYN_REPLY, HEADERS):
                (sid,) = struct.unpack_from("!I", p, 0)
                return ControlFrame(ftype, flags, stream_id=sid & 0x7FFFFFFF, headers=self._headers(p[4:]))
            if ftype == RST_STREAM:
                sid, status = struct.unpack_from("!II", p, 0)
                return ControlFrame(ftype, flags, stream_id=sid & 0x7FFFFFFF, status=status)
            if ftype == SETTINGS:
                (n,) = struct.unpack_from("!I", p, 0)
                entries = []
                for i in range(n):
                    fid, value = struct.unpack_from("!II", p, 4 + 8 * i)
                    entries.append((fid >> 24, fid & 0xFFFFFF, value))
                return ControlFrame(ftype, flags, settings=entries)
            if ftype == PING:
                (pid,) = struct.unpack_from("!I", p, 0)
                return ControlFrame(ftype, flags, ping_id=pid)
            if ftype == GOAWAY:
                last, status = struct.unpack_from("!II", p, 0)
                return ControlFrame(ftype, flags, stream_id=last & 0x7FFFFFFF, status=status)
            if ftype == WINDOW_UPDATE:
                sid, delta = struct.unpack_from("!II", p, 0)
                return ControlFrame(ftype, flags, stream_id=sid & 0x7FFFFFFF, delta=delta & 0x7FFFFFFF)
        except struct.error as exc:
            raise SpdyProtocolError(f"short control frame type {ftype}") from exc
        # Unknown control types must be ignored (draft 3.1 section 2.2.1).
        return ControlFrame(ftype, flags)

    # ---- building ----------------------------------------------------------------------------------
    @staticmethod
    def _control(ftype: int, flags: int, payload: bytes) -> bytes:
        return struct.pack("!HHI", 0x8000 | VERSION, ftype, (flags << 24) | len(payload)) + payload

    def _compress(self, headers: Headers) -> bytes:
        return self._deflate.compress(encode_header_block(headers)) + self._deflate.flush(zlib.Z_SYNC_FLUSH)

    def syn_stream(
        self, stream_id: int, headers: Headers, *, fin: bool = False, unidirectional: bool = False
    ) -> bytes:
        flags = (FLAG_FIN if fin else 0) | (FLAG_UNIDIRECTIONAL if unidirectional else 0)
        body = struct.pack("!IIBB", stream_id, 0, 0, 0) + self._compress(headers)
        return self._control(SYN_STREAM, flags, body)

    def syn_reply(self, stream_id: int, headers: Headers | None = None, *, fin: bool = False) -> bytes:
        body = struct.pack("!I", stream_id) + self._compress(headers or {})
        return self._control(SYN_REPLY, FLAG_FIN if fin else 0, body)

    def rst_stream(self, stream_id: int, status: int = RST_CANCEL) -> bytes:
        return self._control(RST_STREAM, 0, struct.pack("!II", stream_id, status))

    def settings(self, entries: list[tuple[int, int, int]]) -> bytes:
        body = struct.pack("!I", len(entries)) + b"".join(
            struct.pack("!II", (f << 24) | i, v) for f, i, v in entries
        )
        return self._control(SETTINGS, 0, body)

    def ping(self, ping_id: int) -> bytes:
        return self._control(PING, 0, struct.pack("!I", ping_id))

    def goaway(self, last_good_stream: int, status: int = 0) -> bytes:
        return self._control(GOAWAY, 0, struct.pack("!II", last_good_stream, status))

    def window_update(self, stream_id: int, delta: int) -> bytes:
        return self._control(WINDOW_UPDATE, 0, struct.pack("!II", stream_id, delta))

    @staticmethod
    def data(stream_id: int, payload: bytes = b"", *, fin: bool = False) -> bytes:
        """One or more DATA frames (split at the 24-bit length limit); FIN only on the last."""
        out = []
        view = memoryview(payload)
        while True:
            chunk, view = view[:MAX_FRAME_PAYLOAD], view[MAX_FRAME_PAYLOAD:]
            last = len(view) == 0
            flags = FLAG_FIN if (fin and last) else 0
            out.append(struct.pack("!II", stream_id & 0x7FFFFFFF, (flags << 24) | len(chunk)) + bytes(chunk))
            if last:
                return b"".join(out)
