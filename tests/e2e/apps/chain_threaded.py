"""One service of a request chain, thread-per-request style (Flask under gunicorn's gthread
worker, requests with a session per thread). See chain_async.py: the same endpoints and log.
No OpenTelemetry code and no header forwarding, except for request ids starting with "own":
then, given an incoming traceparent, it sends its own downstream with a span id it made in that
trace, as an application with its own tracing does.
"""

import json
import os
import threading

import requests
from flask import Flask, request

NAME = os.environ["CHAIN_NAME"]
NEXT = os.environ.get("CHAIN_NEXT")
LOG = os.environ["CHAIN_LOG"]
app = Flask(__name__)
local = threading.local()


def session():
    if not hasattr(local, "session"):
        local.session = requests.Session()
        local.session.trust_env = False
    return local.session


@app.get("/chain/<rid>")
def chain(rid):
    with open(LOG, "a") as f:
        f.write(json.dumps({"service": NAME, "rid": rid, "traceparent": request.headers.get("traceparent")}) + "\n")
    downstream = None
    incoming = request.headers.get("traceparent")
    headers = {}
    if rid.startswith("own") and incoming:
        headers["traceparent"] = f"{incoming[:36]}{os.urandom(8).hex()}{incoming[52:]}"
    if NEXT:
        downstream = session().get(f"{NEXT}/chain/{rid}", headers=headers, timeout=20).json()
    return {"service": NAME, "rid": rid, "downstream": downstream}


@app.get("/health")
def health():
    return {"ok": True}
