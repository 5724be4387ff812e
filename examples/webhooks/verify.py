"""A crier webhook receiver with nothing but Python's standard library (docs/webhooks.md).

Checks X-Crier-Signature (HMAC-SHA256 of "timestamp.body", compared in constant time),
refuses a timestamp more than 5 minutes off and a signature it already took (a replay),
answers 204, and prints each event as one JSON line on stdout.

    CRIER_WEBHOOK_SECRET=... python3 verify.py [port]   (port 0: any; logged on stderr)
"""

import hashlib
import hmac
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

SECRET = os.environ.get("CRIER_WEBHOOK_SECRET", "").encode()
if len(SECRET) < 32:
    sys.exit("CRIER_WEBHOOK_SECRET must be at least 32 bytes")
MAX_SKEW_S = 300
seen = {}  # signature -> timestamp, kept for the skew window


def check(timestamp, signature, body):
    if not timestamp or not timestamp.isdigit() or abs(time.time() - int(timestamp)) > MAX_SKEW_S:
        return 400, "timestamp missing or too far off"
    mac = hmac.new(SECRET, timestamp.encode() + b"." + body, hashlib.sha256)
    want = "sha256=" + mac.hexdigest()
    if not hmac.compare_digest(want, signature or ""):
        return 401, "bad signature"
    if want in seen:
        return 409, "replayed"
    for s, t in list(seen.items()):
        if time.time() - t > MAX_SKEW_S:
            del seen[s]
    seen[want] = int(timestamp)
    return 204, ""


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status, why = check(
            self.headers.get("X-Crier-Timestamp"), self.headers.get("X-Crier-Signature"), body
        )
        if status == 204:
            for event in json.loads(body)["events"]:
                print(json.dumps(event, separators=(",", ":")), flush=True)
        else:
            print(f"refused: {why}", file=sys.stderr, flush=True)
        self.send_response(status)
        self.end_headers()
        self.wfile.write(why.encode())

    def log_message(self, *args):
        pass


server = HTTPServer(("127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 9000), Receiver)
print(f"listening on {server.server_address[1]}", file=sys.stderr, flush=True)
server.serve_forever()
