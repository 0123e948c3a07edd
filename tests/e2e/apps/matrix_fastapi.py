"""The FastAPI service of the HTTP matrix end-to-end test, run by uvicorn (asyncio loop, h11).

    python matrix_fastapi.py --port P [--host 127.0.0.1 --host ::1]

binds one listening socket per --host on the same port (uvicorn's own CLI binds only one) and
serves the matrix API:

    GET  /hello       200 {"hello": "world"}
    GET  /items/<n>   200 {"id": n}
    GET  /fail        500 {"error": "injected failure"}
    GET  /missing     404 (no such route)
    GET  /big         200, 5 MiB application/octet-stream (HEAD too: no body)
    GET  /stream      200, chunked: 3 chunks of 11 bytes ({"part":1}\n ...)
    POST /echo        200, the request body
"""

import argparse
import asyncio
import socket

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

BIG = b"0123456789abcdef" * (5 * 1024 * 1024 // 16)

app = FastAPI()


@app.api_route("/hello", methods=["GET", "HEAD"])
async def hello():
    return {"hello": "world"}


@app.get("/items/{item_id}")
async def item(item_id: int):
    return {"id": item_id}


@app.get("/fail")
async def fail():
    return JSONResponse(status_code=500, content={"error": "injected failure"})


@app.api_route("/big", methods=["GET", "HEAD"])
async def big():
    return Response(BIG, media_type="application/octet-stream")


@app.get("/stream")
async def stream():
    async def parts():
        for part in (1, 2, 3):
            yield b'{"part":%d}\n' % part
            await asyncio.sleep(0.005)
    return StreamingResponse(parts(), media_type="application/x-ndjson")


@app.post("/echo")
async def echo(request: Request):
    return Response(await request.body(), media_type="application/octet-stream")


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP as getaddrinfo gives uvicorn's own CLI: asyncio sets TCP_NODELAY on
    # accepted sockets only then, and without it a response written as head + body stalls on
    # Nagle's algorithm against a delayed ACK (40 ms per keep-alive request under wrk).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", action="append", default=[])
    args = parser.parse_args()
    sockets = [bind(host, args.port) for host in (args.host or ["127.0.0.1"])]
    config = uvicorn.Config(app, http="h11", loop="asyncio", access_log=False,
                            log_level="warning")
    uvicorn.Server(config).run(sockets=sockets)


if __name__ == "__main__":
    main()
