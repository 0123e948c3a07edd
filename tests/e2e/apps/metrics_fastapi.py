"""The FastAPI service of the metrics end-to-end test (test_metrics.py), run by uvicorn:

    uvicorn metrics_fastapi:app --app-dir tests/e2e/apps --host 127.0.0.1 --port P

The client chooses each answer: how long the handler waits (`delay_ms`, at least that long) and
which status it returns (`status`), so the test knows every request's duration bucket and its
series in advance.

    GET       /a/{id}?delay_ms=N&status=S   S {"route": "a", "delay_ms", "status", "handler_ns"}
    GET       /b?delay_ms=N&status=S        likewise, route "b"
    GET, POST /c?delay_ms=N&status=S        likewise, route "c", plus "received": request body bytes
    GET       /blob?size=N                  200, N bytes application/octet-stream
    GET       /hello                        200 {"hello": "world"} (readiness)
"""

import asyncio
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

app = FastAPI()


async def sleep_at_least(delay_ms: int) -> None:
    """Sleeps no less than delay_ms (asyncio may wake a hair early; top up until it has passed)."""
    start = time.perf_counter_ns()
    target = delay_ms * 1_000_000
    await asyncio.sleep(delay_ms / 1000)
    while time.perf_counter_ns() - start < target:
        await asyncio.sleep(0.0005)


async def answer(route: str, delay_ms: int, status: int, **extra) -> JSONResponse:
    start = time.perf_counter_ns()
    await sleep_at_least(delay_ms)
    return JSONResponse(status_code=status, content={
        "route": route, "delay_ms": delay_ms, "status": status, **extra,
        "handler_ns": time.perf_counter_ns() - start})


@app.get("/a/{item_id}")
async def route_a(item_id: int, delay_ms: int = 0, status: int = 200):
    return await answer("a", delay_ms, status, id=item_id)


@app.get("/b")
async def route_b(delay_ms: int = 0, status: int = 200):
    return await answer("b", delay_ms, status)


@app.api_route("/c", methods=["GET", "POST"])
async def route_c(request: Request, delay_ms: int = 0, status: int = 200):
    body = await request.body()
    return await answer("c", delay_ms, status, received=len(body))


@app.get("/blob")
async def blob(size: int = 0):
    return Response(b"x" * size, media_type="application/octet-stream")


@app.get("/hello")
async def hello():
    return {"hello": "world"}
