"""An HTTP/1.1 client holding kept-alive connections open, driven line by line over stdin.

    python keepalive_client.py --port P --connections K

Opens K connections to 127.0.0.1:P at start (http.client, one request at a time on each) and
prints `{"ready": true, "local_ports": [...]}`. Then each stdin line is a command, run in a
thread of its own so that commands overlap:

    {"tag": "load", "connections": [0, 1], "count": 600, "rate": 100, "first_id": 1,
     "delay_ms": [0, 5], "status_every": 5}

sends `count` requests round-robin over the listed connections, paced at `rate` per second:
GET /items/{first_id + n}?delay_ms=D (D cycling through `delay_ms`), with `&status=500` on every
`status_every`-th one (0: never). When done it prints one line
`{"tag": ..., "results": [{"id", "connection", "local_port", "path", "status", "delay_ms",
"start_ns", "end_ns", "error"}, ...]}` with wall-clock times around each request. A connection
that fails is counted (`error`) and reopened. Two commands must not share a connection. EOF on
stdin ends the client once its commands are done. No OpenTelemetry code.
"""

import argparse
import http.client
import itertools
import json
import sys
import threading
import time

print_lock = threading.Lock()


def emit(obj) -> None:
    with print_lock:
        print(json.dumps(obj), flush=True)


class Connection:
    def __init__(self, port: int):
        self.port = port
        self.conn = None
        self.open()

    def open(self) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        self.conn.connect()

    @property
    def local_port(self) -> int:
        return self.conn.sock.getsockname()[1]

    def get(self, path: str) -> tuple[int | None, str | None, int]:
        local_port = self.local_port
        try:
            self.conn.request("GET", path)
            response = self.conn.getresponse()
            response.read()
            return response.status, None, local_port
        except (OSError, http.client.HTTPException) as err:
            self.conn.close()
            self.open()
            return None, repr(err), local_port


def run(command: dict, connections: list[Connection]) -> None:
    chosen = command["connections"]
    delays = itertools.cycle(command.get("delay_ms", [0]))
    status_every = command.get("status_every", 0)
    rate = command.get("rate", 0)
    results = []
    started = time.monotonic()
    for n in range(command["count"]):
        if rate:
            time.sleep(max(0.0, started + n / rate - time.monotonic()))
        index = chosen[n % len(chosen)]
        item = command["first_id"] + n
        delay = next(delays)
        status = 500 if status_every and (n + 1) % status_every == 0 else 200
        path = f"/items/{item}?delay_ms={delay}" + ("&status=500" if status == 500 else "")
        start_ns = time.time_ns()
        got, error, local_port = connections[index].get(path)
        results.append({"id": item, "connection": index, "local_port": local_port,
                        "path": f"/items/{item}", "status": got, "expected_status": status,
                        "delay_ms": delay, "start_ns": start_ns, "end_ns": time.time_ns(),
                        "error": error})
    emit({"tag": command["tag"], "results": results})


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=4)
    args = parser.parse_args()
    connections = [Connection(args.port) for _ in range(args.connections)]
    emit({"ready": True, "local_ports": [c.local_port for c in connections]})
    threads = []
    for line in sys.stdin:
        if line.strip():
            thread = threading.Thread(target=run, args=(json.loads(line), connections))
            thread.start()
            threads.append(thread)
    for thread in threads:
        thread.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
