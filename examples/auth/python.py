"""Mint a crier subscriber token (HS256 JWT) in an application backend, with Python's
standard library only. docs/auth.md explains the claims.

    CRIER_JWT_SECRET=... python3 examples/auth/python.py alice 'private:*' user:42

prints a token for sub "alice" that may read every topic matching the patterns, valid for
one hour. In a real backend, call mint_token() in the request handler that already knows
who the user is, and hand the token to the browser.
"""

import base64
import hashlib
import hmac
import json
import os
import sys
import time


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def mint_token(secret: str, sub: str, topics: list[str], ttl_seconds: int = 3600) -> str:
    now = int(time.time())
    header = {"alg": "HS256", "typ": "JWT"}
    claims = {"sub": sub, "topics": topics, "iat": now, "exp": now + ttl_seconds}
    signing_input = ".".join(
        b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
    )
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


if __name__ == "__main__":
    secret = os.environ.get("CRIER_JWT_SECRET", "")
    if len(secret.encode()) < 32:
        sys.exit("set CRIER_JWT_SECRET to the server's jwt_secret (at least 32 bytes)")
    if len(sys.argv) < 2:
        sys.exit("usage: python.py SUB [TOPIC_PATTERN...]")
    print(mint_token(secret, sys.argv[1], sys.argv[2:]))
