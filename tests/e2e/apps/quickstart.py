"""The service `cargo xtask run` shows tapwire on: a tiny FastAPI app, served by uvicorn.

Nothing in it knows about tapwire; the agent sees its requests from the kernel.
"""

from fastapi import FastAPI
from fastapi.responses import JSONResponse

app = FastAPI()


@app.get("/hello")
def hello() -> dict:
    return {"message": "hello"}


@app.get("/items/{item_id}")
def item(item_id: int) -> dict:
    return {"id": item_id, "name": f"item-{item_id}"}


@app.get("/fail")
def fail() -> JSONResponse:
    return JSONResponse({"error": "failed on purpose"}, status_code=500)
