"""A raw asyncio TCP server whose answers are a pure function of what it received, so a test
can tell whether a single byte either way was changed, lost or added:

    python digest_server.py --port P [--host 127.0.0.1]

- A connection whose bytes start with `GET /ok` is served as HTTP/1.1 keep-alive: every
  complete head starting with `GET /ok` gets `200 OK` with the body `ok\\n` (no Date header).
- Any other connection is read until the client half-closes it (EOF); then the server answers
  `200 OK`, `Connection: close`, with the body `<byte count> <sha256 hex>\\n` of everything it
  received, and closes. `expected_digest_reply(data)` below is that answer.

One event loop serves every connection (a slowloris client may hold a thousand); reads use
recv (recvfrom) and writes send (sendto).
"""

import argparse
import asyncio
import hashlib

OK_PREFIX = b"GET /ok"
OK_REPLY = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n"


def expected_digest_reply(data: bytes) -> bytes:
    body = b"%d %s\n" % (len(data), hashlib.sha256(data).hexdigest().encode())
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % len(body)) + body


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    received = bytearray()
    mode = None  # "http" or "digest", decided by the first bytes
    try:
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                break
            received += chunk
            if mode is None and len(received) >= len(OK_PREFIX):
                mode = "http" if received.startswith(OK_PREFIX) else "digest"
            while mode == "http" and b"\r\n\r\n" in received:
                end = received.index(b"\r\n\r\n") + 4
                head = bytes(received[:end])
                del received[:end]
                if not head.startswith(OK_PREFIX):
                    return  # a keep-alive connection that stops speaking /ok: hang up
                writer.write(OK_REPLY)
                await writer.drain()
        if mode != "http":
            writer.write(expected_digest_reply(bytes(received)))
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    server = await asyncio.start_server(handle, args.host, args.port, backlog=4096,
                                        limit=1 << 20)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
