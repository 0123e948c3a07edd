"""Gateway: the pipeline's public API, in front of the orchestrator.

    GET /ask?doc=PAGE&q=QUESTION[&max_tokens=N]   200 {"answer", "sources"}; 502 when the pipeline fails
    GET /healthz                                  200

FastAPI under uvicorn; calls the orchestrator with httpx. No OpenTelemetry code anywhere.
"""

from __future__ import annotations

import os

import httpx
from fastapi import FastAPI
from fastapi.responses import JSONResponse

orchestrator = httpx.Client(base_url=os.environ["ORCHESTRATOR_URL"], timeout=10.0)
app = FastAPI(title="gateway")


@app.get("/healthz")
def healthz() -> dict:
    return {"ok": True}


@app.get("/ask")
def ask(doc: str, q: str, max_tokens: int = 256):
    reply = orchestrator.post("/answer", json={"doc": doc, "question": q, "max_tokens": max_tokens})
    if reply.status_code != 200:
        return JSONResponse({"error": "the pipeline could not answer", "upstream": reply.json()},
                            status_code=502)
    return reply.json()
