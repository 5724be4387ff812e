"""Idle memory per connection: opens N WebSockets to crier, each subscribed to one of 100
channels (Pusher: /app/key1 and pusher:subscribe; crier: /ws?topic=), holds them 8 s, and
reports the server's RSS growth per connection (docs/pusher.md, "Measured").

    crier serve --pusher-app-id 1 --pusher-key key1 --pusher-secret s --max-connections 20000 \
      --max-connections-per-ip 20000 --connect-rate-per-ip 100000 --connect-burst-per-ip 20000 &
    python3 tests/pusher/idle.py 127.0.0.1 8080 $! pusher 10000
"""
import asyncio, base64, os, sys, time

host, port, pid, mode, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])

def rss():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

def frame(data: bytes) -> bytes:
    mask = os.urandom(4)
    return bytes([0x81, 0x80 | len(data)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))

async def one(i, conns):
    path = "/app/key1?protocol=7" if mode == "pusher" else f"/ws?topic=idle{i % 100}"
    r, w = await asyncio.open_connection(host, port)
    key = base64.b64encode(os.urandom(16)).decode()
    w.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = await r.readuntil(b"\r\n\r\n")
    assert b" 101 " in head, head[:80]
    if mode == "pusher":
        w.write(frame(('{"event":"pusher:subscribe","data":{"channel":"idle%d"}}' % (i % 100)).encode()))
    conns.append((r, w))

async def main():
    conns = []
    before = rss()
    sem = asyncio.Semaphore(200)
    async def guarded(i):
        async with sem:
            await one(i, conns)
    await asyncio.gather(*(guarded(i) for i in range(n)))
    await asyncio.sleep(8)
    after = rss()
    print(f"{mode}: {n} idle connections, RSS {before} -> {after} KiB, {(after - before) * 1024 / n:.0f} bytes per connection")
    for r, w in conns:
        w.close()

asyncio.run(main())
