"""A TLS client other than rustls, for tests/it/tls.rs: Python's ssl module (OpenSSL).

Usage: tls_client.py PORT CA_FILE

Over https://localhost:PORT (connected to 127.0.0.1, verified against CA_FILE): opens a
WebSocket and an SSE stream on the topic `py`, publishes {"n": 1}, and checks that both
receive it. Prints "ok" and exits 0, or fails with the reason.
"""
import base64
import json
import os
import socket
import ssl
import sys

PORT = int(sys.argv[1])
CTX = ssl.create_default_context(cafile=sys.argv[2])
CTX.minimum_version = ssl.TLSVersion.TLSv1_2


def connect():
    raw = socket.create_connection(("127.0.0.1", PORT), timeout=10)
    return CTX.wrap_socket(raw, server_hostname="localhost")


def read_head(s):
    """The response head, and what came after it."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            raise SystemExit(f"connection closed before the response head: {buf!r}")
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    return head.decode(), rest


def websocket():
    s = connect()
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        (
            "GET /ws?topic=py HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head, rest = read_head(s)
    if not head.startswith("HTTP/1.1 101"):
        raise SystemExit(f"websocket refused: {head}")
    return s, rest


def next_frame(s, buf):
    """One unmasked text frame from the server (payload under 64 KiB), and the rest."""
    while True:
        if len(buf) >= 2:
            n = buf[1] & 0x7F
            start = 2
            if n == 126:
                if len(buf) < 4:
                    n = None
                else:
                    n, start = int.from_bytes(buf[2:4], "big"), 4
            if n is not None and len(buf) >= start + n:
                if buf[0] & 0x0F != 1:
                    raise SystemExit(f"expected a text frame, got opcode {buf[0] & 0x0F}")
                return json.loads(buf[start : start + n]), buf[start + n :]
        chunk = s.recv(4096)
        if not chunk:
            raise SystemExit("websocket closed")
        buf += chunk


def sse():
    s = connect()
    s.sendall(b"GET /sse?topic=py HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n")
    head, rest = read_head(s)
    if not head.startswith("HTTP/1.1 200"):
        raise SystemExit(f"sse refused: {head}")
    return s, rest


def next_event(s, buf):
    """The next SSE event's (name, data), read through the chunked body as text."""
    while True:
        text = buf.decode(errors="replace")
        for block in text.split("\n\n")[:-1]:
            name, data = None, None
            for line in block.split("\n"):
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    data = line[6:]
            if data is not None:
                end = buf.index(block.encode()) + len(block.encode()) + 2
                return name, json.loads(data), buf[end:]
        chunk = s.recv(4096)
        if not chunk:
            raise SystemExit("sse stream closed")
        buf += chunk


def publish():
    s = connect()
    body = b'{"n":1}'
    s.sendall(
        b"POST /api/publish/py HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    head, _ = read_head(s)
    if not head.startswith("HTTP/1.1 200"):
        raise SystemExit(f"publish refused: {head}")
    s.close()


ws, ws_buf = websocket()
ack, ws_buf = next_frame(ws, ws_buf)
assert ack["op"] == "subscribed", ack
es, es_buf = sse()
name, _, es_buf = next_event(es, es_buf)
assert name == "subscribed", name
print("tls:", ws.version(), ws.cipher()[0], flush=True)
publish()
msg, _ = next_frame(ws, ws_buf)
assert msg["data"] == {"n": 1}, msg
name, data, _ = next_event(es, es_buf)
assert data["data"] == {"n": 1}, (name, data)
print("ok")
