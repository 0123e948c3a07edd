"""A local stand-in for an OpenAI-compatible chat completions API (what vLLM, llama.cpp's server
or a hosted API offer), so the pipeline runs without network access or a model.

    POST /v1/chat/completions   the OpenAI request and response shapes; the answer quotes the first
                                sentence of the context and takes ~25 ms plus ~0.1 ms per prompt word
                                400 invalid_request_error when max_tokens > MAX_OUTPUT_TOKENS
    GET /v1/models, GET /healthz
"""

from __future__ import annotations

import itertools
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

MODEL = "pipeline-stub-1"
MAX_OUTPUT_TOKENS = 512
_ids = itertools.count(1)
app = FastAPI(title="llm-stub")


@app.get("/healthz")
def healthz() -> dict:
    return {"ok": True}


@app.get("/v1/models")
def models() -> dict:
    return {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "local"}]}


@app.post("/v1/chat/completions")
async def chat_completions(request: Request):
    body = await request.json()
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 256
    if max_tokens > MAX_OUTPUT_TOKENS:
        return JSONResponse(status_code=400, content={"error": {
            "message": f"max_tokens is too large: {max_tokens}. This model supports at most "
                       f"{MAX_OUTPUT_TOKENS} completion tokens.",
            "type": "invalid_request_error", "param": "max_tokens", "code": None}})
    prompt = " ".join(str(m.get("content", "")) for m in body.get("messages", []))
    prompt_tokens = len(prompt.split())
    time.sleep(0.025 + 0.0001 * prompt_tokens)  # "generation" (blocks: one request at a time)
    context = prompt.split("Context:", 1)[-1].strip()
    first_sentence = context.split(". ")[0].strip()[:300]
    content = f"According to the documentation: {first_sentence}."
    completion_tokens = min(len(content.split()), max_tokens)
    return {
        "id": f"chatcmpl-{next(_ids)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", MODEL),
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }
