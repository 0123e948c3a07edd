"""Scraper: fetches a page of the documentation site and hands it to the content processor.

    POST /scrape {"doc"}   200 {"doc", "chunks", "bytes"}; 502 when the site or the processor fails
    GET /healthz

FastAPI under uvicorn; `requests` for both the site and the processor.
"""

from __future__ import annotations

import os

import requests
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel

SITE_URL = os.environ["SITE_URL"].rstrip("/")
PROCESSOR_URL = os.environ["PROCESSOR_URL"].rstrip("/")
http = requests.Session()
app = FastAPI(title="scraper")


class Page(BaseModel):
    doc: str


@app.get("/healthz")
def healthz() -> dict:
    return {"ok": True}


@app.post("/scrape")
def scrape(page: Page):
    fetched = http.get(f"{SITE_URL}/{page.doc}", timeout=5)
    if fetched.status_code != 200:
        return JSONResponse({"error": f"the site answered {fetched.status_code} for {page.doc}"},
                            status_code=502)
    processed = http.post(f"{PROCESSOR_URL}/process", json={"doc": page.doc, "html": fetched.text},
                          timeout=10)
    if processed.status_code != 200:
        return JSONResponse({"error": "the processor failed", "detail": processed.json()},
                            status_code=502)
    return {"doc": page.doc, "chunks": processed.json()["chunks"], "bytes": len(fetched.content)}
