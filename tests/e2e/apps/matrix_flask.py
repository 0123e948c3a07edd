"""The Flask service of the HTTP matrix end-to-end test, run by gunicorn with threads:

    gunicorn --chdir tests/e2e/apps --worker-class gthread --workers 1 --threads 4 \
        --bind 127.0.0.1:P --bind [::1]:P matrix_flask:app

Serves the matrix API:

    GET  /hello       200 {"hello": "world"}
    GET  /items/<n>   200 {"id": n}
    GET  /fail        500 {"error": "injected failure"}
    GET  /missing     404 (no such route)
    GET  /big         200, 5 MiB application/octet-stream (HEAD too: no body)
    GET  /stream      200, chunked: 3 chunks of 11 bytes ({"part":1}\n ...)
    POST /echo        200, the request body
"""

import time

from flask import Flask, Response, jsonify, request

BIG = b"0123456789abcdef" * (5 * 1024 * 1024 // 16)

app = Flask(__name__)


@app.get("/hello")
def hello():
    return jsonify(hello="world")


@app.get("/items/<int:item_id>")
def item(item_id: int):
    return jsonify(id=item_id)


@app.get("/fail")
def fail():
    return jsonify(error="injected failure"), 500


@app.get("/big")
def big():
    return Response(BIG, mimetype="application/octet-stream")


@app.get("/stream")
def stream():
    def parts():
        for part in (1, 2, 3):
            yield b'{"part":%d}\n' % part
            time.sleep(0.005)
    return Response(parts(), mimetype="application/x-ndjson")


@app.post("/echo")
def echo():
    return Response(request.get_data(), mimetype="application/octet-stream")
