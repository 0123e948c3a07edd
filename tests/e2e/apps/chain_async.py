"""One service of a request chain, asyncio style (FastAPI on uvicorn, httpx.AsyncClient): the
context-propagation tests run several of these and chain_threaded.py, each in its own cgroup and
network namespace. No OpenTelemetry code and no header forwarding: whatever trace context
reaches the next service is what tapwire put there.

    GET /chain/{rid}   logs the request's traceparent (or null) to CHAIN_LOG as a JSON line,
                       calls CHAIN_NEXT/chain/{rid} when CHAIN_NEXT is set, answers 200 JSON
    GET /health        200 (readiness)
"""

import json
import os
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request

NAME = os.environ["CHAIN_NAME"]
NEXT = os.environ.get("CHAIN_NEXT")
LOG = os.environ["CHAIN_LOG"]
state = {}


@asynccontextmanager
async def lifespan(_app):
    async with httpx.AsyncClient(trust_env=False, timeout=20) as client:
        state["client"] = client
        yield


app = FastAPI(lifespan=lifespan)


def log(rid, traceparent):
    with open(LOG, "a") as f:
        f.write(json.dumps({"service": NAME, "rid": rid, "traceparent": traceparent}) + "\n")


@app.get("/chain/{rid}")
async def chain(rid: str, request: Request):
    log(rid, request.headers.get("traceparent"))
    downstream = None
    if NEXT:
        r = await state["client"].get(f"{NEXT}/chain/{rid}")
        downstream = r.json()
    return {"service": NAME, "rid": rid, "downstream": downstream}


@app.get("/health")
async def health():
    return {"ok": True}
