// Mint a crier subscriber token (HS256 JWT) in an application backend, with Go's standard
// library only. docs/auth.md explains the claims.
//
//	CRIER_JWT_SECRET=... go run examples/auth/main.go alice 'private:*' user:42
//
// prints a token for sub "alice" that may read every topic matching the patterns, valid for
// one hour. In a real backend, call mintToken in the request handler that already knows who
// the user is, and hand the token to the browser.
package main

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"time"
)

type claims struct {
	Sub    string   `json:"sub"`
	Topics []string `json:"topics"`
	Iat    int64    `json:"iat"`
	Exp    int64    `json:"exp"`
}

func mintToken(secret, sub string, topics []string, ttl time.Duration) (string, error) {
	now := time.Now().Unix()
	header, err := json.Marshal(map[string]string{"alg": "HS256", "typ": "JWT"})
	if err != nil {
		return "", err
	}
	if topics == nil {
		topics = []string{}
	}
	body, err := json.Marshal(claims{Sub: sub, Topics: topics, Iat: now, Exp: now + int64(ttl.Seconds())})
	if err != nil {
		return "", err
	}
	b64 := base64.RawURLEncoding
	signingInput := b64.EncodeToString(header) + "." + b64.EncodeToString(body)
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write([]byte(signingInput))
	return signingInput + "." + b64.EncodeToString(mac.Sum(nil)), nil
}

func main() {
	secret := os.Getenv("CRIER_JWT_SECRET")
	if len(secret) < 32 {
		fmt.Fprintln(os.Stderr, "set CRIER_JWT_SECRET to the server's jwt_secret (at least 32 bytes)")
		os.Exit(2)
	}
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: main.go SUB [TOPIC_PATTERN...]")
		os.Exit(2)
	}
	token, err := mintToken(secret, os.Args[1], os.Args[2:], time.Hour)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println(token)
}
