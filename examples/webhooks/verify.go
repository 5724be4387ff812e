// A crier webhook receiver with nothing but Go's standard library (docs/webhooks.md).
// Checks X-Crier-Signature (HMAC-SHA256 of "timestamp.body", compared in constant time),
// refuses a timestamp more than 5 minutes off and a signature it already took (a
// replay), answers 204, and prints each event as one JSON line on stdout.
//
//	CRIER_WEBHOOK_SECRET=... go run verify.go [port]   (port 0: any; logged on stderr)
package main

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
	"time"
)

const maxSkew = 300 // seconds

var (
	secret = []byte(os.Getenv("CRIER_WEBHOOK_SECRET"))
	mu     sync.Mutex
	seen   = map[string]int64{} // signature -> timestamp, kept for the skew window
)

func check(timestamp, signature string, body []byte) (int, string) {
	ts, err := strconv.ParseInt(timestamp, 10, 64)
	if err != nil || ts < time.Now().Unix()-maxSkew || ts > time.Now().Unix()+maxSkew {
		return 400, "timestamp missing or too far off"
	}
	mac := hmac.New(sha256.New, secret)
	mac.Write([]byte(timestamp + "."))
	mac.Write(body)
	want := "sha256=" + hex.EncodeToString(mac.Sum(nil))
	if !hmac.Equal([]byte(want), []byte(signature)) {
		return 401, "bad signature"
	}
	mu.Lock()
	defer mu.Unlock()
	if _, ok := seen[want]; ok {
		return 409, "replayed"
	}
	for s, t := range seen {
		if time.Now().Unix()-t > maxSkew {
			delete(seen, s)
		}
	}
	seen[want] = ts
	return 204, ""
}

func receive(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(io.LimitReader(r.Body, 16<<20))
	if err != nil {
		w.WriteHeader(400)
		return
	}
	status, why := check(r.Header.Get("X-Crier-Timestamp"), r.Header.Get("X-Crier-Signature"), body)
	if status == 204 {
		var delivery struct {
			Events []json.RawMessage `json:"events"`
		}
		if json.Unmarshal(body, &delivery) == nil {
			mu.Lock()
			for _, e := range delivery.Events {
				var compact map[string]any
				json.Unmarshal(e, &compact)
				line, _ := json.Marshal(compact)
				fmt.Println(string(line))
			}
			mu.Unlock()
		}
	} else {
		fmt.Fprintln(os.Stderr, "refused:", why)
	}
	w.WriteHeader(status)
	io.WriteString(w, why)
}

func main() {
	if len(secret) < 32 {
		fmt.Fprintln(os.Stderr, "CRIER_WEBHOOK_SECRET must be at least 32 bytes")
		os.Exit(2)
	}
	port := "9000"
	if len(os.Args) > 1 {
		port = os.Args[1]
	}
	l, err := net.Listen("tcp", "127.0.0.1:"+port)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Fprintf(os.Stderr, "listening on %d\n", l.Addr().(*net.TCPAddr).Port)
	http.Serve(l, http.HandlerFunc(receive))
}
