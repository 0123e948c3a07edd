"""LLM orchestrator: fetch and index the page, retrieve the best passages, ask the LLM.

    POST /answer {"doc", "question", "max_tokens"}
        -> scraper POST /scrape {"doc"}          (the page is fetched, chunked, embedded, stored)
        -> search GET /search?q=QUESTION&k=3     (passages nearest to the question)
        -> LLM POST /v1/chat/completions         (the official OpenAI client, any compatible server)
        200 {"answer", "sources"}; 502 when a step fails
    GET /healthz

FastAPI under uvicorn; httpx for the internal services, the `openai` package for the LLM.
"""

from __future__ import annotations

import os

import httpx
import openai
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel

scraper = httpx.Client(base_url=os.environ["SCRAPER_URL"], timeout=10.0)
search = httpx.Client(base_url=os.environ["SEARCH_URL"], timeout=10.0)
llm = openai.OpenAI(base_url=os.environ["LLM_URL"], api_key=os.environ.get("LLM_API_KEY", "local"),
                    max_retries=0, timeout=10.0)
MODEL = os.environ.get("LLM_MODEL", "pipeline-stub-1")

app = FastAPI(title="orchestrator")


class Question(BaseModel):
    doc: str
    question: str
    max_tokens: int = 256


def failed(step: str, detail) -> JSONResponse:
    return JSONResponse({"error": f"{step} failed", "detail": detail}, status_code=502)


@app.get("/healthz")
def healthz() -> dict:
    return {"ok": True}


@app.post("/answer")
def answer(body: Question):
    scraped = scraper.post("/scrape", json={"doc": body.doc})
    if scraped.status_code != 200:
        return failed("scrape", scraped.json())
    found = search.get("/search", params={"q": body.question, "k": 3})
    if found.status_code != 200:
        return failed("search", found.json())
    hits = found.json()["hits"]
    context = "\n\n".join(f"[{h['doc']}] {h['text']}" for h in hits)
    try:
        completion = llm.chat.completions.create(
            model=MODEL,
            max_tokens=body.max_tokens,
            messages=[
                {"role": "system", "content": "Answer from the context only. Cite the pages."},
                {"role": "user", "content": f"Context:\n{context}\n\nQuestion: {body.question}"},
            ],
        )
    except openai.APIStatusError as err:
        return failed("llm", {"status": err.status_code, "message": err.message})
    return {"answer": completion.choices[0].message.content,
            "sources": sorted({h["doc"] for h in hits}),
            "indexed_chunks": scraped.json()["chunks"]}
