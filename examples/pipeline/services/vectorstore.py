"""Vector store: chunks and their embeddings in Redis, brute-force cosine search over them.

    POST /upsert {"doc", "chunks": [{"text", "vector"}]}   replaces the page's chunks; 200 {"stored"}
    POST /query {"vector", "k"}                            200 {"hits": [{"doc", "text", "score"}]}
    GET /healthz                                           200 once Redis answers PING

Keys: `chunk:<doc>:<i>` (hash: doc, text, vector as packed float32), `doc:<doc>` (set of its
chunk keys), `chunks` (set of every chunk key). FastAPI under uvicorn; redis-py to a real
redis-server.
"""

from __future__ import annotations

import array
import heapq
import os

import redis
from fastapi import FastAPI
from pydantic import BaseModel

db = redis.Redis.from_url(os.environ["REDIS_URL"], socket_timeout=5)
app = FastAPI(title="vectorstore")


class Chunk(BaseModel):
    text: str
    vector: list[float]


class Upsert(BaseModel):
    doc: str
    chunks: list[Chunk]


class Query(BaseModel):
    vector: list[float]
    k: int = 3


@app.get("/healthz")
def healthz() -> dict:
    return {"ok": bool(db.ping())}


@app.post("/upsert")
def upsert(body: Upsert) -> dict:
    old = db.smembers(f"doc:{body.doc}")
    pipe = db.pipeline(transaction=True)
    if old:
        pipe.delete(*old)
        pipe.srem("chunks", *old)
        pipe.delete(f"doc:{body.doc}")
    for i, chunk in enumerate(body.chunks):
        key = f"chunk:{body.doc}:{i}"
        pipe.hset(key, mapping={"doc": body.doc, "text": chunk.text,
                                "vector": array.array("f", chunk.vector).tobytes()})
        pipe.sadd(f"doc:{body.doc}", key)
        pipe.sadd("chunks", key)
    pipe.execute()
    return {"stored": len(body.chunks)}


@app.post("/query")
def query(body: Query) -> dict:
    keys = sorted(db.smembers("chunks"))
    pipe = db.pipeline(transaction=False)
    for key in keys:
        pipe.hmget(key, "doc", "text", "vector")
    scored = []
    for doc, text, packed in pipe.execute():
        if packed is None:  # replaced by a concurrent upsert
            continue
        vector = array.array("f")
        vector.frombytes(packed)
        score = sum(a * b for a, b in zip(body.vector, vector))
        scored.append((score, doc.decode(), text.decode()))
    best = heapq.nlargest(body.k, scored)
    return {"hits": [{"doc": d, "text": t, "score": round(s, 4)} for s, d, t in best]}
