// The Go net/http service of tapwire's HTTP matrix end-to-end test (tests/e2e/test_http_matrix.py).
// Standard library only. It listens on every -listen address (e.g. 127.0.0.1:8080 and [::1]:8080)
// and serves the matrix API:
//
//	GET  /hello       200 {"hello":"world"}
//	GET  /items/<n>   200 {"id":n}
//	GET  /fail        500 {"error":"injected failure"}
//	GET  /missing     404 (no such route)
//	GET  /big         200, 5 MiB application/octet-stream (HEAD too: no body)
//	GET  /stream      200, chunked: 3 chunks of 11 bytes ({"part":1}\n ...)
//	POST /echo        200, the request body
//
// Every response but /stream carries Content-Length, so a span's body sizes are exact.
package main

import (
	"bytes"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"
)

const bigSize = 5 * 1024 * 1024

type listenFlags []string

func (l *listenFlags) String() string     { return strings.Join(*l, ",") }
func (l *listenFlags) Set(v string) error { *l = append(*l, v); return nil }

func reply(w http.ResponseWriter, status int, contentType string, body []byte) {
	w.Header().Set("Content-Type", contentType)
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	w.Write(body)
}

func main() {
	var listen listenFlags
	flag.Var(&listen, "listen", "address to listen on (repeatable)")
	flag.Parse()
	if len(listen) == 0 {
		log.Fatal("give at least one -listen address")
	}
	big := bytes.Repeat([]byte("0123456789abcdef"), bigSize/16)

	mux := http.NewServeMux()
	mux.HandleFunc("/hello", func(w http.ResponseWriter, r *http.Request) {
		reply(w, 200, "application/json", []byte(`{"hello":"world"}`))
	})
	mux.HandleFunc("/items/", func(w http.ResponseWriter, r *http.Request) {
		id, err := strconv.Atoi(strings.TrimPrefix(r.URL.Path, "/items/"))
		if err != nil {
			http.NotFound(w, r)
			return
		}
		reply(w, 200, "application/json", []byte(fmt.Sprintf(`{"id":%d}`, id)))
	})
	mux.HandleFunc("/fail", func(w http.ResponseWriter, r *http.Request) {
		reply(w, 500, "application/json", []byte(`{"error":"injected failure"}`))
	})
	mux.HandleFunc("/big", func(w http.ResponseWriter, r *http.Request) {
		reply(w, 200, "application/octet-stream", big)
	})
	mux.HandleFunc("/stream", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/x-ndjson")
		for part := 1; part <= 3; part++ {
			fmt.Fprintf(w, "{\"part\":%d}\n", part)
			w.(http.Flusher).Flush() // no Content-Length: each flush is a chunk
			time.Sleep(5 * time.Millisecond)
		}
	})
	mux.HandleFunc("/echo", func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			reply(w, 405, "text/plain", []byte("POST only\n"))
			return
		}
		body, err := io.ReadAll(r.Body)
		if err != nil {
			reply(w, 400, "text/plain", []byte(err.Error()))
			return
		}
		reply(w, 200, "application/octet-stream", body)
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		reply(w, 404, "text/plain", []byte("not found\n"))
	})

	server := &http.Server{Handler: mux}
	errs := make(chan error, len(listen))
	for _, addr := range listen {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			log.Fatalf("listen %s: %v", addr, err)
		}
		go func() { errs <- server.Serve(ln) }()
	}
	log.Printf("serving on %s", listen.String())
	log.Fatal(<-errs)
}
