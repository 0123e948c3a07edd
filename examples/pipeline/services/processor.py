"""Content processor: HTML to text, text to chunks, chunks to vectors, vectors to the store.

    POST /process {"doc", "html"}   200 {"doc", "chunks", "words"}; 502 when the store fails
    GET /healthz

A threaded Flask app, run by gunicorn with the gthread worker:

    gunicorn --chdir examples/pipeline/services --worker-class gthread --workers 1 --threads 4 \
        --bind 127.0.0.1:PORT processor:app
"""

from __future__ import annotations

import os

import requests
from flask import Flask, jsonify, request

from textutil import chunks, embed, html_to_text

VECTORSTORE_URL = os.environ["VECTORSTORE_URL"].rstrip("/")
http = requests.Session()
app = Flask(__name__)


@app.get("/healthz")
def healthz():
    return jsonify(ok=True)


@app.post("/process")
def process():
    body = request.get_json(force=True)
    text = html_to_text(body["html"])
    pieces = chunks(text)
    stored = http.post(f"{VECTORSTORE_URL}/upsert", timeout=10, json={
        "doc": body["doc"],
        "chunks": [{"text": piece, "vector": embed(piece)} for piece in pieces],
    })
    if stored.status_code != 200:
        return jsonify(error="the vector store failed", detail=stored.json()), 502
    return jsonify(doc=body["doc"], chunks=len(pieces), words=len(text.split()))
