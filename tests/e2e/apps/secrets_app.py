"""A FastAPI service that handles secrets, for the redaction test. No OpenTelemetry code.

Every secret is `SECRET_SEED` followed by a suffix naming where it travels, so that finding the
seed anywhere in what tapwire exports means a leak.

    POST /login?token=...        reads the form body; answers 200 with
                                 `Set-Cookie: session=<seed>-login-set-cookie`, a secret in the
                                 response body, and which secret headers it received
    GET /forward?port=P&token=.. answers with `Set-Cookie: relay=<seed>-forward-set-cookie`
                                 after calling POST http://127.0.0.1:P/login?api_key=<seed>-cli-query
                                 with Authorization, Proxy-Authorization, Cookie and X-Api-Key
                                 holding <seed>-cli-* values and a secret form body (a new
                                 connection each time); returns what /login said and the
                                 Set-Cookie it got
    GET /hello                   200 {"hello": "world"}
"""

import json
import os
import urllib.request

from fastapi import FastAPI, Request, Response

SEED = os.environ["SECRET_SEED"]
SECRET_HEADERS = ("authorization", "proxy-authorization", "cookie", "x-api-key")

app = FastAPI()
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def client_secrets() -> dict[str, str]:
    """The headers /forward sends; the test knows them from the seed."""
    return {
        "Authorization": f"Bearer {SEED}-cli-authorization",
        "Proxy-Authorization": f"Basic {SEED}-cli-proxy-authorization",
        "Cookie": f"sid={SEED}-cli-cookie",
        "X-Api-Key": f"{SEED}-cli-x-api-key",
    }


@app.post("/login")
async def login(request: Request, response: Response):
    body = (await request.body()).decode()
    response.set_cookie("session", f"{SEED}-login-set-cookie", httponly=True)
    return {
        "token": f"{SEED}-login-response-body",
        "headers": {h: request.headers.get(h, "") for h in SECRET_HEADERS},
        "query": str(request.url.query),
        "body": body,
    }


@app.get("/forward")
def forward(port: int, response: Response):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/login?api_key={SEED}-cli-query&page=2",
        data=f"user=alice&password={SEED}-cli-body".encode(), method="POST",
        headers={**client_secrets(), "Content-Type": "application/x-www-form-urlencoded"})
    with _opener.open(req, timeout=10) as answer:
        login = json.loads(answer.read())
        set_cookie = answer.headers.get("Set-Cookie", "")
    response.set_cookie("relay", f"{SEED}-forward-set-cookie")
    return {"login": login, "set_cookie": set_cookie}


@app.get("/hello")
def hello():
    return {"hello": "world"}
