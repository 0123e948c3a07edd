"""A minimal threaded HTTP/1.1 server whose socket I/O uses one chosen syscall pair, so the HTTP
matrix end-to-end test covers the data paths that no off-the-shelf server here uses:

    python matrix_raw.py --io msg --port P --host 127.0.0.1 --host ::1   # recvmsg / sendmsg
    python matrix_raw.py --io vec --port P --host 127.0.0.1 --host ::1   # readv / writev

Keep-alive, pipelining (requests are answered in order from one buffer), Content-Length request
bodies and HTTP/1.0 are supported; chunked request bodies are not. Serves the matrix API:

    GET  /hello       200 {"hello": "world"}
    GET  /items/<n>   200 {"id": n}
    GET  /fail        500 {"error": "injected failure"}
    GET  /missing     404 (no such route)
    GET  /big         200, 5 MiB application/octet-stream (HEAD too: no body)
    GET  /stream      200, chunked: 3 chunks of 11 bytes ({"part":1}\n ...)
    POST /echo        200, the request body
"""

import argparse
import os
import re
import socket
import threading
import time

BIG = b"0123456789abcdef" * (5 * 1024 * 1024 // 16)
ITEM = re.compile(rb"^/items/(\d+)$")
REASONS = {100: b"Continue", 200: b"OK", 404: b"Not Found", 405: b"Method Not Allowed",
           500: b"Internal Server Error"}


class Io:
    """recv/send on a connected socket through exactly one syscall pair."""

    def __init__(self, sock: socket.socket, mode: str):
        self.sock, self.mode, self.fd = sock, mode, sock.fileno()

    def recv(self, size: int = 65536) -> bytes:
        if self.mode == "msg":
            data, _, _, _ = self.sock.recvmsg(size)
            return data
        buf = bytearray(size)
        n = os.readv(self.fd, [memoryview(buf)[: size // 2], memoryview(buf)[size // 2:]])
        return bytes(buf[:n])

    def send(self, head: bytes, body: bytes) -> None:
        """Head and body in one sendmsg/writev (two buffers), looping over partial writes."""
        parts = [memoryview(head), memoryview(body)]
        while parts:
            if self.mode == "msg":
                sent = self.sock.sendmsg(parts)
            else:
                sent = os.writev(self.fd, parts)
            while parts and sent >= len(parts[0]):
                sent -= len(parts[0])
                parts.pop(0)
            if parts and sent:
                parts[0] = parts[0][sent:]
            parts = [p for p in parts if len(p)]


def route(method: bytes, target: bytes, body: bytes) -> tuple[int, bytes, bytes]:
    path = target.split(b"?", 1)[0]
    if method == b"POST" and path == b"/echo":
        return 200, b"application/octet-stream", body
    if method not in (b"GET", b"HEAD"):
        return 405, b"text/plain", b"GET only\n"
    if path == b"/hello":
        return 200, b"application/json", b'{"hello":"world"}'
    match = ITEM.match(path)
    if match:
        return 200, b"application/json", b'{"id":%d}' % int(match.group(1))
    if path == b"/fail":
        return 500, b"application/json", b'{"error":"injected failure"}'
    if path == b"/big":
        return 200, b"application/octet-stream", BIG
    return 404, b"text/plain", b"not found\n"


def serve_connection(sock: socket.socket, mode: str) -> None:
    io = Io(sock, mode)
    buf = b""
    try:
        while True:
            while b"\r\n\r\n" not in buf:
                data = io.recv()
                if not data:
                    return
                buf += data
            head, buf = buf.split(b"\r\n\r\n", 1)
            lines = head.split(b"\r\n")
            method, target, version = lines[0].split(b" ", 2)
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get(b"content-length", b"0"))
            if length and headers.get(b"expect", b"").lower() == b"100-continue" \
                    and len(buf) < length:
                io.send(b"HTTP/1.1 100 Continue\r\n\r\n", b"")
            while len(buf) < length:
                data = io.recv()
                if not data:
                    return
                buf += data
            body, buf = buf[:length], buf[length:]
            if method == b"GET" and target.split(b"?", 1)[0] == b"/stream":
                io.send(b"%s 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n" % version, b"")
                for part in (1, 2, 3):
                    data = b'{"part":%d}\n' % part
                    io.send(b"%x\r\n" % len(data), data + b"\r\n")
                    time.sleep(0.005)
                io.send(b"0\r\n\r\n", b"")
                continue
            status, ctype, payload = route(method, target, body)
            connection = headers.get(b"connection", b"").lower()
            keep = (connection != b"close") if version == b"HTTP/1.1" else \
                (connection == b"keep-alive")
            out = (b"%s %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                   % (version, status, REASONS[status], ctype, len(payload)))
            if version == b"HTTP/1.0" and keep:
                out += b"Connection: keep-alive\r\n"
            io.send(out + b"\r\n", b"" if method == b"HEAD" else payload)
            if not keep:
                return
    except (ConnectionError, ValueError):
        return
    finally:
        sock.close()


def accept_loop(listener: socket.socket, mode: str) -> None:
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve_connection, args=(conn, mode), daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--io", choices=["msg", "vec"], required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", action="append", default=[])
    args = parser.parse_args()
    threads = []
    for host in args.host or ["127.0.0.1"]:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        listener.bind((host, args.port))
        listener.listen(128)
        threads.append(threading.Thread(target=accept_loop, args=(listener, args.io),
                                         daemon=True))
    for thread in threads:
        thread.start()
    print(f"serving ({args.io}) on {args.host} port {args.port}", flush=True)
    for thread in threads:
        thread.join()


if __name__ == "__main__":
    main()
