"""The demo's traffic: questions to the gateway, a known share of them failing on purpose.

Every loop here is bounded in count and in time: `burst` sends at most `len(asks)` requests and
stops submitting at its deadline.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import threading
import time

import requests

# (page, question) pairs the site answers; the pages are in examples/pipeline/site/.
QUESTIONS = [
    ("getting-started.html", "How does a question move through the pipeline?"),
    ("tracing.html", "How do spans nest across services?"),
    ("metrics.html", "Which signals do we alert on?"),
    ("cgroups.html", "How do I see that a service is throttled?"),
    ("redis.html", "How are vectors stored in Redis?"),
    ("incidents.html", "What does a 400 from the model mean?"),
]
# A page the site does not have: the site answers 404, the scraper, orchestrator and gateway 502.
MISSING_PAGE = "pricing.html"
# More than the LLM stub allows (512): it answers 400, the orchestrator and the gateway 502.
TOO_MANY_TOKENS = 1024


@dataclasses.dataclass(frozen=True)
class Ask:
    doc: str
    question: str
    max_tokens: int = 256

    @property
    def expected(self) -> str:
        if self.doc == MISSING_PAGE:
            return "missing page"
        if self.max_tokens > 512:
            return "too many tokens"
        return "ok"


def plan(count: int) -> list[Ask]:
    """`count` asks cycling through QUESTIONS; every 10th (from the 4th) asks about the missing
    page and every 10th (from the 8th) asks for too many tokens."""
    asks = []
    for i in range(count):
        doc, question = QUESTIONS[i % len(QUESTIONS)]
        if i % 10 == 3:
            asks.append(Ask(MISSING_PAGE, "How much does it cost?"))
        elif i % 10 == 7:
            asks.append(Ask(doc, question, TOO_MANY_TOKENS))
        else:
            asks.append(Ask(doc, question))
    return asks


def expected_requests(asks: list[Ask]) -> dict[str, int]:
    """Requests each watched service serves for `asks`: every ask reaches the gateway, the
    orchestrator and the scraper; those whose page exists also the processor (which stores it:
    one vector store request) and the search service (one vector store query)."""
    found = sum(1 for a in asks if a.expected != "missing page")
    return {"gateway": len(asks), "orchestrator": len(asks), "scraper": len(asks),
            "processor": found, "search": found, "vectorstore": 2 * found}


def expected_errors(asks: list[Ask]) -> dict[str, int]:
    """Requests each watched service answers with a 5xx for `asks`."""
    missing = sum(1 for a in asks if a.expected == "missing page")
    tokens = sum(1 for a in asks if a.expected == "too many tokens")
    return {"gateway": missing + tokens, "orchestrator": missing + tokens, "scraper": missing,
            "processor": 0, "search": 0, "vectorstore": 0}


@dataclasses.dataclass
class Outcome:
    ask: Ask
    status: int  # 0: no answer (connection error or timeout)
    seconds: float


def new_traceparent() -> tuple[str, str]:
    """A W3C traceparent for a request the demo starts itself: (header value, trace id)."""
    trace_id, span_id = os.urandom(16).hex(), os.urandom(8).hex()
    return f"00-{trace_id}-{span_id}-01", trace_id


def send(session: requests.Session, gateway: str, ask: Ask,
         headers: dict[str, str] | None = None) -> Outcome:
    start = time.monotonic()
    try:
        reply = session.get(f"{gateway}/ask", params={"doc": ask.doc, "q": ask.question,
                                                      "max_tokens": ask.max_tokens},
                            headers=headers, timeout=10)
        status = reply.status_code
    except requests.RequestException:
        status = 0
    return Outcome(ask, status, time.monotonic() - start)


def burst(gateway: str, asks: list[Ask], concurrency: int, deadline_s: float) -> list[Outcome]:
    """Sends `asks` with `concurrency` clients (one keep-alive connection each); stops submitting
    when `deadline_s` has passed. Returns the outcomes of the asks sent, in order."""
    local = threading.local()
    sessions: list[requests.Session] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + deadline_s

    def one(ask: Ask) -> Outcome | None:
        if time.monotonic() > stop_at:
            return None
        if not hasattr(local, "session"):
            local.session = requests.Session()
            local.session.trust_env = False  # loopback only, whatever proxy the environment names
            with lock:
                sessions.append(local.session)
        return send(local.session, gateway, ask)

    try:
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(one, asks))
    finally:
        for session in sessions:
            session.close()
    return [r for r in results if r is not None]
