"""Search service: embeds the query and asks the vector store for the nearest chunks.

    GET /search?q=QUERY&k=N   200 {"query", "hits": [{"doc", "text", "score"}]}
    GET /healthz

FastAPI under uvicorn; httpx for the vector store.
"""

from __future__ import annotations

import os

import httpx
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from textutil import embed

store = httpx.Client(base_url=os.environ["VECTORSTORE_URL"], timeout=10.0)
app = FastAPI(title="search")


@app.get("/healthz")
def healthz() -> dict:
    return {"ok": True}


@app.get("/search")
def search(q: str, k: int = 3):
    reply = store.post("/query", json={"vector": embed(q), "k": k})
    if reply.status_code != 200:
        return JSONResponse({"error": "the vector store failed", "detail": reply.json()},
                            status_code=502)
    return {"query": q, "hits": reply.json()["hits"]}
