"""HTTP client driver of the HTTP matrix end-to-end test: runs a plan of requests with one client
library and prints one JSON object per request (what a span must show), as a JSON list.

    python matrix_client.py PLAN_JSON

PLAN_JSON: {"client": "requests" | "httpx" | "raw",
            "requests": [{"method", "url", "headers": {..}, "body_size": N}, ...]}
    requests, httpx: one keep-alive session for the whole plan;
    raw: each entry carries "host", "port" and "payload" (latin-1 text): written in one send()
         on a fresh connection, then the response is read until the server closes.

Result per request: status, body_len, local_port, remote_ip, client_ns (perf_counter around the
whole exchange), wall_start_ns / wall_end_ns (time.time_ns() just before / after).
It runs as a separate process so a test can put it inside a watched cgroup (CLIENT spans).
"""

import json
import socket
import sys
import time


def with_requests(plan):
    import requests

    session = requests.Session()
    session.trust_env = False
    out = []
    for req in plan:
        body = b"x" * req.get("body_size", 0) if req.get("body_size") else None
        wall_start, start = time.time_ns(), time.perf_counter_ns()
        resp = session.request(req["method"], req["url"], headers=req.get("headers", {}),
                               data=body, timeout=10, stream=True)
        sock = resp.raw._connection.sock
        local, remote = sock.getsockname(), sock.getpeername()
        content = resp.content
        client_ns = time.perf_counter_ns() - start
        out.append({"status": resp.status_code, "body_len": len(content),
                    "local_port": local[1], "remote_ip": remote[0], "client_ns": client_ns,
                    "wall_start_ns": wall_start, "wall_end_ns": time.time_ns()})
    session.close()
    return out


def with_httpx(plan):
    import httpx

    out = []
    with httpx.Client(trust_env=False, timeout=10) as client:
        for req in plan:
            body = b"x" * req.get("body_size", 0) if req.get("body_size") else None
            wall_start, start = time.time_ns(), time.perf_counter_ns()
            with client.stream(req["method"], req["url"], headers=req.get("headers", {}),
                               content=body) as resp:
                stream = resp.extensions["network_stream"]
                local = stream.get_extra_info("client_addr")
                remote = stream.get_extra_info("server_addr")
                content = resp.read()
            client_ns = time.perf_counter_ns() - start
            out.append({"status": resp.status_code, "body_len": len(content),
                        "local_port": local[1], "remote_ip": remote[0], "client_ns": client_ns,
                        "wall_start_ns": wall_start, "wall_end_ns": time.time_ns()})
    return out


def with_raw(plan):
    out = []
    for req in plan:
        family = socket.AF_INET6 if ":" in req["host"] else socket.AF_INET
        wall_start, start = time.time_ns(), time.perf_counter_ns()
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect((req["host"], req["port"]))
            sock.sendall(req["payload"].encode("latin-1"))
            chunks = []
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
            local = sock.getsockname()
        client_ns = time.perf_counter_ns() - start
        response = b"".join(chunks)
        head, _, body = response.partition(b"\r\n\r\n")
        out.append({"status": int(head.split(b" ", 2)[1]), "body_len": len(body),
                    "local_port": local[1], "remote_ip": req["host"], "client_ns": client_ns,
                    "wall_start_ns": wall_start, "wall_end_ns": time.time_ns()})
    return out


def main() -> None:
    plan = json.loads(sys.argv[1])
    run = {"requests": with_requests, "httpx": with_httpx, "raw": with_raw}[plan["client"]]
    print(json.dumps(run(plan["requests"])))


if __name__ == "__main__":
    main()
