"""A FastAPI service whose handler calls another HTTP service: the caller of the service-graph
tests.

    GET /call?port=P&path=/items/1   GET http://127.0.0.1:P/items/1 (a new connection each time)
        -> 200 {"status": <the callee's status>, "elapsed_ns": <time around the call>}
    GET /hello                       200 {"hello": "world"}

The call is made with urllib in a plain `def` handler (run in FastAPI's thread pool), so the
outbound request goes out while the inbound one is being served. No OpenTelemetry code.
"""

import time
import urllib.error
import urllib.request

from fastapi import FastAPI

app = FastAPI()

# No proxy whatever the environment says: the callee is on loopback.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@app.get("/call")
def call(port: int, path: str):
    start = time.perf_counter_ns()
    try:
        with _opener.open(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as err:
        err.read()
        status = err.code
    return {"status": status, "elapsed_ns": time.perf_counter_ns() - start}


@app.get("/hello")
def hello():
    return {"hello": "world"}
