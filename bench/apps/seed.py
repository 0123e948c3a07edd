"""The seed-like service of `cargo xtask bench`: FastAPI under uvicorn, a fixed amount of CPU work
per request (about 1.5 ms here), the shape of a typical small Python API.

The work is a fixed number of loop iterations, not a time budget: if anything slows the process
down, every request takes longer and the throughput shows it. The handler is `async def` and
computes inline, so one uvicorn worker serves one request at a time, like a CPU-bound service.

    GET /work    200 {"result": N, "iterations": K}   K = SEED_WORK_ITERATIONS (default 20000)
    GET /hello   200 {"hello": "world"}                 readiness, no work
    GET /stats   200 {"requests": N, "work_cpu_ms_mean": X}   thread CPU time of the work loop

Nothing here knows about tapwire or OpenTelemetry: the bench runs it as is (tapwire watches its
cgroup), or under `opentelemetry-instrument` (the OpenTelemetry Python SDK's zero-code mode).
"""

import os
import time

from fastapi import FastAPI

WORK_ITERATIONS = int(os.environ.get("SEED_WORK_ITERATIONS", "20000"))

app = FastAPI()

_requests = 0
_work_cpu_ns = 0


def cpu_work(iterations: int) -> int:
    """A deterministic integer loop (an LCG-like fold): pure interpreter work, no syscalls."""
    acc = 0
    for i in range(iterations):
        acc = (acc * 31 + i) & 0xFFFFFFFF
    return acc


@app.get("/work")
async def work() -> dict:
    global _requests, _work_cpu_ns
    start = time.thread_time_ns()
    result = cpu_work(WORK_ITERATIONS)
    _work_cpu_ns += time.thread_time_ns() - start
    _requests += 1
    return {"result": result, "iterations": WORK_ITERATIONS}


@app.get("/hello")
async def hello() -> dict:
    return {"hello": "world"}


@app.get("/stats")
async def stats() -> dict:
    mean_ms = _work_cpu_ns / _requests / 1e6 if _requests else 0.0
    return {"requests": _requests, "work_cpu_ms_mean": round(mean_ms, 3),
            "iterations": WORK_ITERATIONS}
