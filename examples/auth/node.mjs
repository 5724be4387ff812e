// Mint a crier subscriber token (HS256 JWT) in an application backend, with Node's standard
// library only. docs/auth.md explains the claims.
//
//   CRIER_JWT_SECRET=... node examples/auth/node.mjs alice 'private:*' user:42
//
// prints a token for sub "alice" that may read every topic matching the patterns, valid for
// one hour. In a real backend, call mintToken() in the request handler that already knows
// who the user is, and hand the token to the browser.
import { createHmac } from "node:crypto";

const b64url = (buf) => Buffer.from(buf).toString("base64url");

/**
 * @param {string} secret the server's jwt_secret (at least 32 bytes)
 * @param {string} sub who the token is for
 * @param {string[]} topics topic names or patterns ending in `*`
 * @param {number} ttlSeconds how long the token is valid
 */
export function mintToken(secret, sub, topics, ttlSeconds = 3600) {
  const now = Math.floor(Date.now() / 1000);
  const header = { alg: "HS256", typ: "JWT" };
  const claims = { sub, topics, iat: now, exp: now + ttlSeconds };
  const signingInput = `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(claims))}`;
  const signature = createHmac("sha256", secret).update(signingInput).digest();
  return `${signingInput}.${b64url(signature)}`;
}

const secret = process.env.CRIER_JWT_SECRET;
if (!secret || Buffer.byteLength(secret) < 32) {
  console.error("set CRIER_JWT_SECRET to the server's jwt_secret (at least 32 bytes)");
  process.exit(2);
}
const [sub, ...topics] = process.argv.slice(2);
if (!sub) {
  console.error("usage: node.mjs SUB [TOPIC_PATTERN...]");
  process.exit(2);
}
console.log(mintToken(secret, sub, topics));
