"""The FastAPI service the end-to-end tests put under tapwire.

Handlers report how long they ran (`handler_ns`, measured with perf_counter from handler entry to
return) so a test can check a span covers at least the handler's time.

    GET /items/{id}?delay_ms=N   sleeps N ms, 200 {"id", "delay_ms", "handler_ns"}
                                 (`&status=S`: answers S instead of 200)
    GET /fail?delay_ms=N         sleeps N ms, 500 {"error", "delay_ms", "handler_ns"}
    GET /hello                   200 {"hello": "world", "handler_ns"}
"""

import asyncio
import time

from fastapi import FastAPI
from fastapi.responses import JSONResponse

app = FastAPI()


async def sleep_at_least(delay_ms: int) -> None:
    """Sleeps no less than delay_ms (asyncio may wake a hair early; top up until it has passed)."""
    start = time.perf_counter_ns()
    target = delay_ms * 1_000_000
    await asyncio.sleep(delay_ms / 1000)
    while time.perf_counter_ns() - start < target:
        await asyncio.sleep(0.0005)


@app.get("/items/{item_id}")
async def get_item(item_id: int, delay_ms: int = 0, status: int = 200):
    start = time.perf_counter_ns()
    await sleep_at_least(delay_ms)
    return JSONResponse(status_code=status, content={
        "id": item_id, "delay_ms": delay_ms, "handler_ns": time.perf_counter_ns() - start})


@app.get("/fail")
async def fail(delay_ms: int = 0):
    start = time.perf_counter_ns()
    await sleep_at_least(delay_ms)
    return JSONResponse(status_code=500, content={
        "error": "injected failure", "delay_ms": delay_ms,
        "handler_ns": time.perf_counter_ns() - start})


@app.get("/hello")
async def hello():
    start = time.perf_counter_ns()
    return {"hello": "world", "handler_ns": time.perf_counter_ns() - start}
