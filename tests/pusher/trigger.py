"""The PyPI server SDK `pusher`, unchanged, against crier: trigger, trigger_batch,
channels_info and a forged secret refused. Receives through a raw WebSocket (the Pusher
protocol by hand, so this driver needs nothing but the SDK and the standard library).

    CRIER_ADDR=127.0.0.1:PORT python trigger.py
"""
import base64
import json
import os
import socket
import sys

import pusher

host, port = os.environ["CRIER_ADDR"].split(":")
port = int(port)
sdk = pusher.Pusher(app_id="1", key="key1", secret="secret1", host=host, port=port, ssl=False)
forged = pusher.Pusher(app_id="1", key="key1", secret="wrong", host=host, port=port, ssl=False)


def ws_connect(path):
    s = socket.create_connection((host, port), timeout=5)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert b" 101 " in head, head
    return s


def recv_exact(s, n):
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        assert chunk, "closed"
        out += chunk
    return out


def recv_text(s):
    b0, b1 = recv_exact(s, 2)
    n = b1 & 127
    if n == 126:
        n = int.from_bytes(recv_exact(s, 2), "big")
    elif n == 127:
        n = int.from_bytes(recv_exact(s, 8), "big")
    return json.loads(recv_exact(s, n))


def send_text(s, obj):
    data = json.dumps(obj).encode()
    mask = os.urandom(4)
    head = bytes([0x81])
    head += bytes([0x80 | len(data)]) if len(data) < 126 else bytes([0x80 | 126]) + len(data).to_bytes(2, "big")
    s.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))


s = ws_connect("/app/key1?protocol=7&client=python-test&version=1")
hello = recv_text(s)
assert hello["event"] == "pusher:connection_established", hello
send_text(s, {"event": "pusher:subscribe", "data": {"channel": "py-channel"}})
ok = recv_text(s)
assert ok["event"] == "pusher_internal:subscription_succeeded", ok

try:
    forged.trigger("py-channel", "forged", {"x": 1})
    sys.exit("a forged trigger was accepted")
except pusher.errors.PusherBadAuth:
    pass

sdk.trigger("py-channel", "from-python", {"n": 1})
m = recv_text(s)
assert m["event"] == "from-python" and json.loads(m["data"]) == {"n": 1}, m
sdk.trigger_batch([
    {"channel": "py-channel", "name": "b1", "data": "one"},
    {"channel": "py-channel", "name": "b2", "data": {"two": 2}},
])
assert recv_text(s)["event"] == "b1"
assert json.loads(recv_text(s)["data"]) == {"two": 2}
info = sdk.channel_info("py-channel", ["subscription_count"])
assert info["occupied"] and info["subscription_count"] == 1, info
chans = sdk.channels_info(prefix_filter="py-")
assert "py-channel" in chans["channels"], chans
print("ok: python SDK")
