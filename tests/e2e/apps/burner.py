"""A service that spends known amounts of CPU and memory on request, for the resource metrics
end-to-end test (test_metrics.py). Standard library only; one request at a time.

    python burner.py --port P

    GET /burn?ms=N    busy-loops until this thread has used N ms of CPU time
                      200 {"cpu_ns": CPU time the loop used, "wall_ns"}
    GET /alloc?mb=N   allocates N MiB, writes a byte in every page so all of it is resident, and
                      keeps it; 200 {"held_mib": MiB held in total}
    GET /hello        200 {"hello": "world"} (readiness)
"""

import argparse
import json
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, HTTPServer

PAGE = 4096
HELD: list[bytearray] = []


def burn(ms: int) -> dict:
    start_cpu, start_wall = time.thread_time_ns(), time.perf_counter_ns()
    target = ms * 1_000_000
    x = 0
    while time.thread_time_ns() - start_cpu < target:
        for i in range(10_000):
            x += i * i
    return {"cpu_ns": time.thread_time_ns() - start_cpu,
            "wall_ns": time.perf_counter_ns() - start_wall}


def alloc(mib: int) -> dict:
    block = bytearray(mib * 1024 * 1024)
    for offset in range(0, len(block), PAGE):
        block[offset] = 1
    HELD.append(block)
    return {"held_mib": sum(len(b) for b in HELD) // (1024 * 1024)}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def do_GET(self):  # noqa: N802 (http.server naming)
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        if url.path == "/burn":
            body = burn(int(query.get("ms", "0")))
        elif url.path == "/alloc":
            body = alloc(int(query.get("mb", "0")))
        elif url.path == "/hello":
            body = {"hello": "world"}
        else:
            self.send_error(404)
            return
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    HTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
