"""One FleetUser.Place call, made with the standard library only.

sbatch runs this (through cli_filter.lua and sbatch_filter.py) on every submission, so it must
start fast: importing grpcio alone costs 100-200 ms (it imports asyncio), protobuf more. The
call is one unary gRPC request over HTTP/2 (RFC 9113): the client preface, an empty SETTINGS,
one HEADERS frame (HPACK literals, never indexed, RFC 7541 6.2.2) and one DATA frame; the
reply is read until the stream ends. PlaceRequest and PlaceReply are encoded by hand in the
protobuf wire format; the field numbers are proto/gpufleet/v1/fleet.proto's (a unit test checks
both against the generated classes).

Anything unexpected (no message before the stream ends, a reset, a timeout) is a PlaceCallError:
the caller then submits the job as it was given. Response headers are never decoded (that
would need a full HPACK decoder): a reply message arrives only when the call succeeded.
Plaintext calls use the C `_socket` module (socket.py's import pulls in enum and selectors);
TLS goes through ssl and socket as usual.
"""

from __future__ import annotations

import _socket  # socket.py imports enum and selectors (~10-20 ms); TLS calls import it
import struct
import time

PATH = "/gpufleet.v1.FleetUser/Place"
METADATA_KEY = "gpufleet-munge-cred"  # = user_service.METADATA_KEY
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST, _SETTINGS, _PING, _GOAWAY = 0, 1, 3, 4, 6, 7
_END_STREAM, _ACK, _END_HEADERS, _PADDED, _PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
MAX_REPLY_BYTES = 4 * 1024 * 1024


class PlaceCallError(Exception):
    """The call did not give a reply; the message says where it stopped."""


class PlaceRequest:
    """FleetUser's PlaceRequest (plain classes here: dataclasses cost ~10 ms to import)."""

    def __init__(self, nodes: int | None = None, gpus_per_node: int | None = None,
                 total_gpus: int | None = None, partition: str = "",
                 constraints: list[str] | None = None, time_limit_min: int | None = None,
                 exclude: list[str] | None = None) -> None:
        self.nodes = nodes
        self.gpus_per_node = gpus_per_node
        self.total_gpus = total_gpus
        self.partition = partition
        self.constraints = constraints or []
        self.time_limit_min = time_limit_min
        self.exclude = exclude or []


class PlaceReply:
    def __init__(self) -> None:
        self.ok = False
        self.nodes: list[str] = []
        self.flags: list[str] = []
        self.cost: dict[str, float] = {}
        self.explanation: list[str] = []
        self.avoid: list[str] = []


# ---------------------------------------------------------------- protobuf wire format

def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _str_field(num: int, text: str) -> bytes:
    data = text.encode()
    return varint(num << 3 | 2) + varint(len(data)) + data


def encode_request(r: PlaceRequest) -> bytes:
    out = bytearray()
    for num, value in ((1, r.nodes), (2, r.gpus_per_node), (3, r.total_gpus)):
        if value is not None:
            out += varint(num << 3) + varint(value)
    if r.partition:
        out += _str_field(4, r.partition)
    for c in r.constraints:
        out += _str_field(5, c)
    if r.time_limit_min is not None:
        out += varint(6 << 3) + varint(r.time_limit_min)
    for n in r.exclude:
        out += _str_field(7, n)
    return bytes(out)


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise PlaceCallError("reply: truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def _fields(buf: bytes) -> list[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of one message; lengths checked."""
    out: list[tuple[int, int, int | bytes]] = []
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        num, wt = key >> 3, key & 7
        value: int | bytes
        if wt == 0:
            value, i = _read_varint(buf, i)
        elif wt == 1:
            value, i = buf[i:i + 8], i + 8
        elif wt == 2:
            n, i = _read_varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wt == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise PlaceCallError(f"reply: unsupported wire type {wt}")
        if i > len(buf):
            raise PlaceCallError("reply: truncated field")
        out.append((num, wt, value))
    return out


def decode_reply(buf: bytes) -> PlaceReply:
    r = PlaceReply()
    for num, wt, value in _fields(buf):
        if num == 1 and wt == 0:
            r.ok = bool(value)
        elif wt == 2 and isinstance(value, bytes):
            if num == 2:  # PlacedNode: node = 1
                r.nodes.extend(v.decode() for n, w, v in _fields(value)
                               if n == 1 and isinstance(v, bytes))
            elif num == 3:
                r.flags.append(value.decode())
            elif num == 5:  # map<string, double>: key = 1, value = 2
                key, val = "", 0.0
                for n, w, v in _fields(value):
                    if n == 1 and isinstance(v, bytes):
                        key = v.decode()
                    elif n == 2 and w == 1 and isinstance(v, bytes):
                        val = struct.unpack("<d", v)[0]
                r.cost[key] = val
            elif num == 6:
                r.explanation.append(value.decode())
            elif num == 8:
                r.avoid.append(value.decode())
    return r


# ---------------------------------------------------------------- HTTP/2 + HPACK

def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    top = (1 << prefix_bits) - 1
    if value < top:
        return bytes([first | value])
    out = bytearray([first | top])
    value -= top
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_literals(headers: list[tuple[str, str]]) -> bytes:
    """Each header as a literal without indexing, new name, no Huffman coding."""
    out = bytearray()
    for name, value in headers:
        n, v = name.encode(), value.encode()
        out += b"\x00" + _hpack_int(len(n), 7) + n + _hpack_int(len(v), 7) + v
    return bytes(out)


def _frame(ftype: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(
        ">I", stream) + payload


def _recv_exact(sock: _socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise PlaceCallError("no reply in time")
        sock.settimeout(left)
        try:
            chunk = sock.recv(n - len(buf))
        except TimeoutError as e:
            raise PlaceCallError("no reply in time") from e
        if not chunk:
            raise PlaceCallError("connection closed before the reply")
        buf += chunk
    return bytes(buf)


def unary_call(sock: _socket.socket, authority: str, path: str, message: bytes,
               metadata: list[tuple[str, str]], deadline: float, scheme: str = "http") -> bytes:
    """One gRPC unary call on a connected socket; the reply message's bytes."""
    headers = [(":method", "POST"), (":scheme", scheme), (":path", path),
               (":authority", authority), ("content-type", "application/grpc"),
               ("te", "trailers"), *metadata]
    timeout_ms = max(1, int((deadline - time.monotonic()) * 1000))
    headers.append(("grpc-timeout", f"{timeout_ms}m"))
    body = b"\x00" + struct.pack(">I", len(message)) + message
    sock.sendall(_PREFACE + _frame(_SETTINGS, 0, 0, b"")
                 + _frame(_HEADERS, _END_HEADERS, 1, hpack_literals(headers))
                 + _frame(_DATA, _END_STREAM, 1, body))
    data = bytearray()
    while True:
        head = _recv_exact(sock, 9, deadline)
        length = int.from_bytes(head[:3], "big")
        ftype, flags, stream = head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
        if len(data) + length > MAX_REPLY_BYTES:
            raise PlaceCallError("reply too large")
        payload = _recv_exact(sock, length, deadline)
        if ftype == _SETTINGS and not flags & _ACK:
            sock.sendall(_frame(_SETTINGS, _ACK, 0, b""))
        elif ftype == _PING and not flags & _ACK:
            sock.sendall(_frame(_PING, _ACK, 0, payload))
        elif ftype == _GOAWAY or (ftype == _RST and stream == 1):
            raise PlaceCallError("the controller reset the call")
        elif stream == 1 and ftype in (_DATA, _HEADERS):
            if ftype == _DATA:
                pad = payload[0] if flags & _PADDED else 0
                data += payload[1 if flags & _PADDED else 0:len(payload) - pad]
            if flags & _END_STREAM:
                break
    if len(data) < 5:
        raise PlaceCallError("the controller refused the call (no reply message)")
    size = struct.unpack(">I", data[1:5])[0]
    if data[0] != 0 or len(data) < 5 + size:
        raise PlaceCallError("reply message compressed or truncated")
    return bytes(data[5:5 + size])


class Tls:
    def __init__(self, ca: str, cert: str | None = None, key: str | None = None) -> None:
        self.ca = ca
        self.cert = cert
        self.key = key


def _connect(host: str, port: int, timeout_s: float) -> _socket.socket:
    """socket.create_connection with the C module: each address in turn."""
    last: OSError | None = None
    name = host.encode() if host.isascii() else host  # str goes through the idna codec
    for family, kind, proto, _, addr in _socket.getaddrinfo(name, port, 0,
                                                            _socket.SOCK_STREAM):
        sock = _socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout_s)
            sock.connect(addr)
        except OSError as e:
            sock.close()
            last = e
            continue
        return sock
    raise last or OSError(f"{host}: no address")


def _tls_connect(host: str, port: int, timeout_s: float) -> _socket.socket:
    import socket

    return socket.create_connection((host, port), timeout=timeout_s)


def place(address: str, request: PlaceRequest, credential: str, timeout_s: float,
          tls: Tls | None) -> PlaceReply:
    """FleetUser.Place at HOST:PORT; plaintext when tls is None."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdecimal():
        raise PlaceCallError(f"controller {address!r}: expected HOST:PORT")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout_s
    try:
        sock = _connect(host, int(port), timeout_s) if tls is None else \
            _tls_connect(host, int(port), timeout_s)
    except OSError as e:
        raise PlaceCallError(f"controller {address}: {e}") from e
    try:
        scheme = "http"
        if tls is not None:
            import ssl

            ctx = ssl.create_default_context(cafile=tls.ca)
            if tls.cert:
                ctx.load_cert_chain(tls.cert, tls.key)
            ctx.set_alpn_protocols(["h2"])
            sock = ctx.wrap_socket(sock, server_hostname=host)  # type: ignore[arg-type]
            scheme = "https"
        reply = unary_call(sock, address, PATH, encode_request(request),
                           [(METADATA_KEY, credential)], deadline, scheme)
    except OSError as e:
        raise PlaceCallError(f"controller {address}: {e}") from e
    finally:
        sock.close()
    return decode_reply(reply)
