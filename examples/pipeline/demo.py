"""`cargo xtask demo`: tapwire on a document pipeline of six services, start to finish.

    python examples/pipeline/demo.py --tapwire target/release/tapwire [--keep] [--asks N]

1. cgroups, then the dependencies (static site, LLM stub, redis-server) and the six services;
2. an OTLP/HTTP receiver (tests/e2e/otlp_receiver.py) and `tapwire run` exporting spans to it,
   with its Prometheus endpoint on a free loopback port;
3. one request alone, started with a W3C traceparent so its trace is easy to find, then a
   bounded burst of requests (a known share failing on purpose), while the Prometheus endpoint
   is scraped every half second for queues;
4. prints the trace of the first request (from the spans), the per-service table and the
   service graph (from the Prometheus endpoint);
5. stops everything and removes the cgroups (with --keep: only after Ctrl-C).

Exit status: 0 when everything ran and was cleaned up, 1 otherwise (the reason is printed).
Root only (cgroups, eBPF). Loopback only.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

import report
import stack
import traffic
from stack import WATCHED, log

SCRAPE_EVERY_S = 0.5
# tapwire refreshes what its Prometheus endpoint serves every second.
SNAPSHOT_S = 1.0
BURST_DEADLINE_S = 30.0
# tapwire's service graph holds a span this long for its other half (then: an unwatched peer).
GRAPH_WAIT_S = 5.0
GRAPH_PENDING = "tapwire_agent_service_graph_pending"


def scrape(url: str) -> list[report.Sample]:
    reply = requests.get(url, timeout=5)
    reply.raise_for_status()
    return report.parse_prometheus(reply.text)


def fresh_scrape(url: str, condition, timeout: float = 5.0) -> list[report.Sample]:
    """Scrapes until `condition(samples)` holds (tapwire's snapshot catches up within a second),
    at most `timeout` seconds; returns the last scrape either way."""
    deadline = time.monotonic() + timeout
    samples = scrape(url)
    while not condition(samples) and time.monotonic() < deadline:
        time.sleep(0.2)
        samples = scrape(url)
    return samples


class Sampler(threading.Thread):
    """Scrapes every SCRAPE_EVERY_S until stopped (bounded by the burst's own deadline)."""

    def __init__(self, url: str):
        super().__init__(name="scraper", daemon=True)
        self.url = url
        self.samples: list[list[report.Sample]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(SCRAPE_EVERY_S):
            try:
                self.samples.append(scrape(self.url))
            except (requests.RequestException, ValueError):
                pass  # a missed sample only makes the queue peak coarser


def section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 90 - len(title)), flush=True)


def run(args: argparse.Namespace, pipeline: stack.Stack) -> bool:
    """Everything between start and clean-up; False when a check failed."""
    pipeline.create_cgroups()
    pipeline.start_services()
    pipeline.start_agent()
    gateway = pipeline.url("gateway")
    ports = pipeline.port_names()
    watched = set(WATCHED)

    # The starting point of every delta: once tapwire measures the CPU of every service.
    before = fresh_scrape(pipeline.prometheus_url, lambda s: set(WATCHED) <= set(
        report.by_job(s, "container_cpu_time_seconds_total")))
    before_t = time.monotonic()

    # One request alone: its trace is the one printed.
    traceparent, trace_id = traffic.new_traceparent()
    first_ask = traffic.Ask(*traffic.QUESTIONS[0])
    with requests.Session() as session:
        session.trust_env = False
        first = traffic.send(session, gateway, first_ask, headers={"traceparent": traceparent})
    log(f"GET /ask (traceparent trace id {trace_id}) -> {first.status} in "
        f"{first.seconds * 1000:.1f} ms")

    asks = traffic.plan(args.asks)
    log(f"sending {len(asks)} more questions to the gateway, {args.concurrency} at a time "
        f"(every 10th about a page the site does not have, every 10th asking the LLM for too "
        f"many tokens)")
    sampler = Sampler(pipeline.prometheus_url)
    sampler.start()
    burst_start = time.monotonic()
    outcomes = traffic.burst(gateway, asks, args.concurrency, BURST_DEADLINE_S)
    burst_s = time.monotonic() - burst_start
    sampler.stopped.set()
    sampler.join()
    sent = [first_ask] + [o.ask for o in outcomes]
    statuses: dict[int, int] = {}
    for o in [first, *outcomes]:
        statuses[o.status] = statuses.get(o.status, 0) + 1
    answers = ", ".join(f"{n} x {s or 'no answer'}" for s, n in sorted(statuses.items()))
    log(f"{len(outcomes)} questions in {burst_s:.1f} s ({len(outcomes) / burst_s:.1f}/s); "
        f"answers: {answers}")
    expected = traffic.expected_requests(sent)
    expected_errors = traffic.expected_errors(sent)

    # The table: once tapwire's snapshot counts every request the gateway served.
    after = fresh_scrape(pipeline.prometheus_url, lambda s: report.by_job(
        s, f"{report.DURATION}_count").get("gateway", 0) >= expected["gateway"])
    window_s = time.monotonic() - before_t
    # The graph: once no span waits for its other half any more (one whose other half never
    # comes, a call from or to a service tapwire does not watch, waits GRAPH_WAIT_S).
    log(f"waiting for tapwire's service graph to settle (a call from or to a service it does not "
        f"watch is known as such after {GRAPH_WAIT_S:.0f} s)")
    settled = fresh_scrape(pipeline.prometheus_url, lambda s: sum(
        x.value for x in s if x.name == GRAPH_PENDING) == 0, timeout=GRAPH_WAIT_S + 5)
    want_spans = 2 * sum(expected.values())  # a SERVER span per request, about as many CLIENT
    try:
        pipeline.receiver.wait_for_spans(want_spans, timeout=5.0, settle=0.5)
    except AssertionError:
        pass  # printed below as it is: the table and the tree show what arrived
    spans = pipeline.receiver.spans()

    ok = True
    section(f"one request through the pipeline: GET /ask?doc={first_ask.doc} (trace {trace_id})")
    tree, rows = report.trace_tree(spans, trace_id, ports, watched)
    print(tree)
    in_trace = {span["service_name"] for _, span in rows}
    if not watched <= in_trace:
        print(f"\nThis trace holds {len(in_trace & watched)} of the {len(watched)} services: the "
              f"trace context did not reach the others, whose spans start traces of their own.")

    section(f"per service, over {len(sent)} requests to the gateway in {burst_s:.1f} s")
    table = report.service_table(WATCHED, before, after, sampler.samples, burst_s, window_s)
    print(report.format_table(table))
    print("rate: requests/s over the burst; errors: 5xx answers; p50/p95: from tapwire's duration "
          "histogram (interpolated within buckets);\ncpu: of one core, over the run; memory: the "
          "service's cgroup (or its processes' RSS); queue: most requests in flight + connections waiting to be accepted, "
          f"sampled every {SCRAPE_EVERY_S} s")
    mismatches = [f"{r.service}: {r.requests} requests (expected {expected[r.service]}), "
                  f"{r.errors} errors (expected {expected_errors[r.service]})"
                  for r in table if (r.requests, r.errors) != (expected[r.service],
                                                               expected_errors[r.service])]
    if mismatches:
        print("\nNOT AS EXPECTED from the requests sent:\n  " + "\n  ".join(mismatches))
        ok = False
    else:
        print(f"\nEvery count is what the requests sent imply "
              f"({', '.join(f'{s} {n}' for s, n in expected.items())}).")

    section("service graph (tapwire's traces_service_graph_* metrics over the same requests)")
    print(report.format_graph(report.service_graph(before, settled)))
    print("* not watched by tapwire: `user` is whoever called without being watched (here the "
          "demo itself), other names are the\n  address the callers used (here the static site, "
          "called by the scraper, and the LLM stub, called by the orchestrator)")

    section("where to look")
    print(f"Prometheus endpoint: {pipeline.prometheus_url} (also /healthz)")
    print(f"spans: OTLP/HTTP to {pipeline.receiver.http_endpoint}/v1/traces "
          f"({len(spans)} received); logs of every process: {pipeline.log_dir}")
    if args.keep:
        print(f"gateway: {gateway}/ask?doc=tracing.html&q=how+do+spans+nest\n"
              f"Everything keeps running (--keep): press Ctrl-C to stop it and clean up.",
              flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    else:
        print("Stopping everything (--keep leaves the pipeline, tapwire and this endpoint running).",
              flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tapwire", required=True, help="the tapwire binary")
    parser.add_argument("--keep", action="store_true",
                        help="keep everything running after the report, until Ctrl-C")
    parser.add_argument("--asks", type=int, default=80,
                        help="questions in the burst (1..1000, default 80)")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="clients sending them at once (1..32, default 4)")
    parser.add_argument("--log-dir", type=Path, help="where every process's output goes "
                        "(the logs of an earlier run there are replaced; default: a new "
                        "directory under /tmp)")
    args = parser.parse_args(argv)
    if not 1 <= args.asks <= 1000:
        parser.error(f"--asks {args.asks}: must be in 1..1000")
    if not 1 <= args.concurrency <= 32:
        parser.error(f"--concurrency {args.concurrency}: must be in 1..32")
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="tapwire-demo-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    for old in [*log_dir.glob("*.log"), *log_dir.glob("tapwire.std*")]:
        old.unlink()

    # Ctrl-C, SIGTERM and SIGHUP end the demo through the clean-up below (SIGINT too when the
    # shell that started us ignored it, as shells do for background jobs).
    def interrupt(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)

    started = time.monotonic()
    pipeline = stack.Stack(args.tapwire, log_dir)
    ok = False
    try:
        ok = run(args, pipeline)
    except KeyboardInterrupt:
        log("interrupted")
    except (AssertionError, RuntimeError, OSError, requests.RequestException, ValueError) as err:
        log(f"failed: {err}")
        if pipeline.agent is not None:
            log(pipeline.agent.diagnostics(20))
    finally:
        problems = pipeline.close()
    if problems:
        log("clean-up left something behind:\n" + "\n".join(problems))
        return 1
    stopped = "tapwire and the pipeline" if pipeline.agent is not None else "the pipeline"
    removed = f", removed cgroup {pipeline.root_cgroup}" if pipeline.root_cgroup else ""
    log(f"stopped {stopped}{removed}; nothing left running "
        f"({time.monotonic() - started:.1f} s in all)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
