"""The first service of the two-service chain in test_sampling.py: calls the next one.

    GET /front/{id}   GET $BACKEND_URL/items/{id} (one kept-alive httpx client), answers its
                      status with {"id", "backend_status"}
    GET /hello        200 {"hello": "world"}

With FORWARD_TRACEPARENT=1 the incoming `traceparent` header is copied verbatim onto the
outbound request (what an application with its own propagation would do); with 0 nothing is
added by the application: propagation is then up to tapwire's own header injection.
No OpenTelemetry code.
"""

import os

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

BACKEND_URL = os.environ["BACKEND_URL"]
FORWARD = os.environ.get("FORWARD_TRACEPARENT", "1") == "1"

app = FastAPI()
client = httpx.AsyncClient(base_url=BACKEND_URL, timeout=10.0, trust_env=False)


@app.get("/front/{item_id}")
async def front(item_id: int, request: Request):
    headers = {}
    incoming = request.headers.get("traceparent")
    if FORWARD and incoming is not None:
        headers["traceparent"] = incoming
    response = await client.get(f"/items/{item_id}", headers=headers)
    return JSONResponse(status_code=response.status_code,
                        content={"id": item_id, "backend_status": response.status_code})


@app.get("/hello")
async def hello():
    return {"hello": "world"}
