"""The threaded Flask service of the metrics end-to-end test (test_metrics.py), run by gunicorn:

    gunicorn --chdir tests/e2e/apps --worker-class gthread --workers 1 --threads 4 \
        --bind 127.0.0.1:P metrics_flask:app

Same API as metrics_fastapi.py: the client chooses each answer's delay and status.

    GET       /a/<id>?delay_ms=N&status=S   S {"route": "a", "delay_ms", "status", "handler_ns"}
    GET       /b?delay_ms=N&status=S        likewise, route "b"
    GET, POST /c?delay_ms=N&status=S        likewise, route "c", plus "received": request body bytes
    GET       /hello                        200 {"hello": "world"} (readiness)
"""

import time

from flask import Flask, jsonify, request

app = Flask(__name__)


def sleep_at_least(delay_ms: int) -> None:
    """Sleeps no less than delay_ms, whatever the sleep's own rounding."""
    start = time.perf_counter_ns()
    target = delay_ms * 1_000_000
    time.sleep(delay_ms / 1000)
    while time.perf_counter_ns() - start < target:
        time.sleep(0.0005)


def answer(route: str, **extra):
    start = time.perf_counter_ns()
    delay_ms = request.args.get("delay_ms", 0, type=int)
    status = request.args.get("status", 200, type=int)
    sleep_at_least(delay_ms)
    return jsonify(route=route, delay_ms=delay_ms, status=status, **extra,
                   handler_ns=time.perf_counter_ns() - start), status


@app.get("/a/<int:item_id>")
def route_a(item_id: int):
    return answer("a", id=item_id)


@app.route("/c", methods=["GET", "POST"])
def route_c():
    return answer("c", received=len(request.get_data()))


@app.get("/b")
def route_b():
    return answer("b")


@app.get("/hello")
def hello():
    return jsonify(hello="world")
