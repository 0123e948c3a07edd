"""Collector trouble: down for a while, slow, or rejecting part of the data.

tapwire watches a FastAPI service under steady load and exports to the test's own OTLP receiver
(otlp_receiver.py), which goes down, answers slowly, or answers with an OTLP partial success.
In every case the agent keeps running, holds at most its configured queue, counts every span
(`tapwire_agent_spans_total{state}`: created = exported + failed + dropped once the queue has
drained), logs each kind of loss at most once per interval (never once per span), and exports
again as soon as the collector does.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import threading
import time

import pytest
import requests

import procs
from otlp_receiver import OtlpReceiver
from test_metrics import Exposition, scrape_metrics, vm_rss_bytes

# The agent's rate limit for warnings: one line per kind per 10 s (agent/src/export/mod.rs,
# LOG_INTERVAL). Lines of one kind must never be closer than this (less the timestamps'
# rounding).
LOG_INTERVAL_S = 10.0
LOG_GAP_SLACK_S = 0.05

QUEUE = 200  # OTEL_BSP_MAX_QUEUE_SIZE
BATCH = 50  # OTEL_BSP_MAX_EXPORT_BATCH_SIZE

SPANS_TIMEOUT_S = 30
STOPPED_FIELDS = ("spans_created", "spans_sampled_out", "spans_exported", "spans_failed",
                  "spans_dropped")


# ---- load, logs and counters --------------------------------------------------------------------

@dataclasses.dataclass
class Sent:
    item: int
    status: int | None
    error: str | None


class Load:
    """GET /items/{id} on one kept-alive connection, paced at `rate` per second, from a thread.

    Bounded: at most `count` requests and `seconds` seconds, whichever comes first. Ids are
    consecutive from `first_id`, so every span names the request it stands for.
    """

    def __init__(self, base_url: str, first_id: int, rate: float, count: int, seconds: float):
        self.base_url, self.first_id = base_url, first_id
        self.rate, self.count, self.seconds = rate, count, seconds
        self.sent: list[Sent] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    def _run(self) -> None:
        session = requests.Session()
        session.trust_env = False  # loopback only
        started = time.monotonic()
        try:
            for n in range(self.count):
                due = started + n / self.rate
                if due - started > self.seconds or self._stop.is_set():
                    break
                time.sleep(max(0.0, due - time.monotonic()))
                item = self.first_id + n
                try:
                    status = session.get(f"{self.base_url}/items/{item}", timeout=5).status_code
                    self.sent.append(Sent(item, status, None))
                except requests.RequestException as err:
                    self.sent.append(Sent(item, None, repr(err)))
        finally:
            session.close()

    def start(self) -> "Load":
        self._thread.start()
        return self

    def join(self) -> "Load":
        self._thread.join(self.seconds + 30)
        assert not self._thread.is_alive(), "the load thread did not end in time"
        return self

    def stop(self) -> "Load":
        self._stop.set()
        return self.join()

    def running(self) -> bool:
        return self._thread.is_alive()

    @property
    def errors(self) -> list[Sent]:
        return [s for s in self.sent if s.error is not None or s.status != 200]

    @property
    def ids(self) -> set[int]:
        return {s.item for s in self.sent}


def run_load(base_url: str, first_id: int, count: int, rate: float = 200.0) -> Load:
    load = Load(base_url, first_id, rate, count, seconds=count / rate + 1).start().join()
    assert load.errors == [], f"the watched service failed requests: {load.errors[:5]}"
    assert len(load.sent) == count
    return load


_LOG_RE = re.compile(r"^(\S+)\s+(TRACE|DEBUG|INFO|WARN|ERROR)\s+(\S+):\s(.*)$")


@dataclasses.dataclass
class LogLine:
    at: float  # unix seconds
    level: str
    target: str
    text: str

    def field(self, name: str) -> str | None:
        match = re.search(rf"\b{re.escape(name)}=(\"(?:[^\"\\]|\\.)*\"|\S+)", self.text)
        return match[1].strip('"') if match else None


def log_lines(stderr: str) -> list[LogLine]:
    """tracing's default format: `2026-11-05T10:00:00.123456Z  WARN target: message k=v ...`."""
    out = []
    for line in stderr.splitlines():
        match = _LOG_RE.match(re.sub(r"\x1b\[[0-9;]*m", "", line))
        if match:
            at = datetime.datetime.fromisoformat(match[1].replace("Z", "+00:00")).timestamp()
            out.append(LogLine(at, match[2], match[3], match[4]))
    return out


def warnings_about(stderr: str, message: str, **fields: str) -> list[LogLine]:
    return [line for line in log_lines(stderr)
            if line.level == "WARN" and line.text.startswith(message)
            and all(line.field(k) == v for k, v in fields.items())]


def assert_rate_limited(lines: list[LogLine], what: str) -> None:
    """Lines of one kind: never two within the agent's log interval."""
    gaps = [b.at - a.at for a, b in zip(lines, lines[1:])]
    assert all(g >= LOG_INTERVAL_S - LOG_GAP_SLACK_S for g in gaps), \
        f"{what}: lines closer than {LOG_INTERVAL_S} s apart: gaps {gaps}"


def stopped_counts(stderr: str) -> dict[str, int]:
    """The totals of the agent's last line (`stopped spans_created=... ...`)."""
    lines = [line for line in log_lines(stderr) if line.text.startswith("stopped")]
    assert len(lines) == 1, f"expected one `stopped` line, got {len(lines)}:\n{stderr[-3000:]}"
    return {name: int(lines[0].field(name)) for name in STOPPED_FIELDS}


def span_totals(expo: Exposition) -> dict[str, int]:
    return {state: int(expo.total("tapwire_agent_spans_total", job="tapwire", state=state) or 0)
            for state in ("created", "sampled_out", "exported", "failed", "dropped")}


def queue_size(expo: Exposition) -> int:
    value = expo.total("tapwire_agent_export_queue_size", job="tapwire")
    assert value is not None, expo.lines(("tapwire_agent_",), job="tapwire")
    return int(value)


def wait_for(check, timeout: float, interval: float = 0.25):
    """check() -> (done, detail); returns the last detail, raising when not done in time."""
    deadline = time.monotonic() + timeout
    while True:
        done, detail = check()
        if done:
            return detail
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout} s: {detail}")
        time.sleep(interval)


def spans_by_item(receiver: OtlpReceiver) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for span in receiver.spans():
        path = span["attributes"].get("url.path", "")
        assert path.startswith("/items/"), f"a span for a request never sent: {span}"
        out.setdefault(int(path.rsplit("/", 1)[1]), []).append(span)
    return out


# ---- fixtures -----------------------------------------------------------------------------------

@dataclasses.dataclass
class Setup:
    service: procs.ServiceProcess
    agent: procs.TapwireProcess
    receiver: OtlpReceiver
    prometheus_port: int

    def scrape(self) -> Exposition:
        return scrape_metrics(self.prometheus_port)

    def settled(self, sent: int) -> dict[str, int]:
        """Waits until the agent made a span of every request and its queue drained."""
        def check():
            expo = self.scrape()
            totals = span_totals(expo)
            queued = queue_size(expo)
            done = (totals["created"] == sent and queued == 0
                    and totals["exported"] + totals["failed"] + totals["dropped"] == sent)
            return done, {**totals, "queued": queued, "sent": sent}
        detail = wait_for(check, SPANS_TIMEOUT_S)
        return {k: v for k, v in detail.items() if k not in ("queued", "sent")}


@pytest.fixture
def collector_setup(cgroup, fastapi_service, tapwire, otlp_receiver):
    def make(protocol: str, **env: str) -> Setup:
        cg = cgroup("outage")
        service = fastapi_service(cg, label="outage-svc")
        port = procs.free_port()
        agent = tapwire([cg], label="tapwire-outage", args=["--prometheus-listen",
                                                            f"127.0.0.1:{port}"],
                        env={**otlp_receiver.exporter_env(protocol),
                             "OTEL_METRICS_EXPORTER": "prometheus", **env})
        return Setup(service, agent, otlp_receiver, port)
    return make


PROTOCOLS = [pytest.param("grpc", id="grpc"), pytest.param("http/protobuf", id="http-protobuf")]


# ---- the collector goes down and comes back -----------------------------------------------------

OUTAGE_S = 22.0
OUTAGE_RATE = 150.0
# Resident memory may move by this much while the queue is full and spans are being dropped.
# A queue that grew with the outage would hold every span dropped meanwhile: thousands of spans of
# several hundred bytes each, well above this.
RSS_SLACK_BYTES = 1 << 20
RESUME_WITHIN_S = 5.0 + 1.0 + 1.0


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_collector_outage(collector_setup, protocol):
    """The collector is down for 22 s (the issue says 60 s; 22 s spans more than two log
    intervals, which is what shows that losses are logged once per interval and not once per
    span, and it fills the queue after about 2 s, after which nothing changes but the counters:
    a longer outage only takes longer), under 150 requests per second, then back on the same
    ports.

    Checked: the agent never stops; the export queue (OTEL_BSP_MAX_QUEUE_SIZE=200) fills and
    never exceeds 200, and the agent's memory stays flat while it is full; every span is
    accounted for (created = exported + failed + dropped, each request exactly one span, the
    receiver holds exactly the exported ones); the queue-full and export-failure warnings come
    at most once per 10 s with the counts they held back; and every request sent after the
    collector came back arrives.
    """
    setup = collector_setup(protocol, OTEL_BSP_MAX_QUEUE_SIZE=str(QUEUE),
                            OTEL_BSP_MAX_EXPORT_BATCH_SIZE=str(BATCH),
                            OTEL_EXPORTER_OTLP_TIMEOUT="1000")
    receiver, agent, base = setup.receiver, setup.agent, setup.service.base_url

    before = run_load(base, 1, 100)
    receiver.wait_for_spans(100, SPANS_TIMEOUT_S, diagnostics=agent.diagnostics)

    rss_before = vm_rss_bytes(agent.pid)
    receiver.stop()
    outage_started = time.time()
    load = Load(base, 10_001, OUTAGE_RATE, count=int(OUTAGE_S * OUTAGE_RATE),
                seconds=OUTAGE_S).start()
    samples = []  # (seconds into the outage, queue size, dropped, rss)
    while load.running():
        expo = setup.scrape()
        samples.append((time.time() - outage_started, queue_size(expo),
                        span_totals(expo)["dropped"], vm_rss_bytes(agent.pid)))
        time.sleep(0.5)
    load.join()
    assert agent.running(), agent.diagnostics()
    requests_before = len(receiver.trace_requests())
    receiver.start()
    outage_ended = time.time()
    assert load.errors == [], f"the watched service failed requests: {load.errors[:5]}"

    # Export resumes with the next attempt: at most one retry delay (5 s at most, with
    # jitter) plus one request timeout (1 s) after the collector is back.
    wait_for(lambda: (len(receiver.trace_requests()) > requests_before, "no export yet"),
             RESUME_WITHIN_S)
    resumed_after = time.time() - outage_ended
    # The spans queued during the outage go first, at once; then new spans flow again.
    after = run_load(base, 20_001, 100)
    sent = len(before.sent) + len(load.sent) + len(after.sent)
    totals = setup.settled(sent)

    # The queue: full, never beyond its size; memory flat meanwhile.
    assert max(q for _, q, _, _ in samples) == QUEUE, samples
    full = [s for s in samples if s[1] == QUEUE]
    first_full = full[0]
    rss_growth = max(rss for *_, rss in samples if _[0] >= first_full[0]) - first_full[3]
    dropped_meanwhile = samples[-1][2] - first_full[2]
    assert dropped_meanwhile >= 1000, samples
    assert rss_growth <= RSS_SLACK_BYTES, \
        (f"agent RSS grew by {rss_growth} B while {dropped_meanwhile} spans were dropped "
         f"with a full queue: {samples}")

    # Every span accounted for, exactly.
    assert totals["sampled_out"] == 0
    assert totals["dropped"] > 0 and totals["failed"] > 0, totals
    by_item = spans_by_item(receiver)
    assert receiver.span_count() == totals["exported"], \
        f"receiver holds {receiver.span_count()} spans, the agent exported {totals}"
    assert {i: len(s) for i, s in by_item.items() if len(s) != 1} == {}, "duplicated spans"
    assert set(by_item) <= before.ids | load.ids | after.ids
    assert before.ids <= set(by_item), "spans from before the outage are missing"
    assert after.ids <= set(by_item), "spans from after the outage are missing"

    # Logged at most once per interval (with what was held back), never per span.
    agent_stop = agent.stop()
    assert agent_stop == 0, agent.diagnostics()
    stderr = agent.stderr()
    full_lines = warnings_about(stderr, "the span export queue is full")
    assert_rate_limited(full_lines, "queue full")
    assert 2 <= len(full_lines) <= OUTAGE_S / LOG_INTERVAL_S + 2, full_lines
    reported = sum(int(line.field("dropped_since_last_warning")) for line in full_lines)
    assert reported == int(full_lines[-1].field("dropped_total")) <= totals["dropped"]
    failed_lines = warnings_about(stderr, "export failed", what="spans")
    kinds = {line.field("kind") for line in failed_lines}
    for kind in kinds:
        assert_rate_limited([line for line in failed_lines if line.field("kind") == kind], kind)
    assert 1 <= len(failed_lines) <= len(kinds) * (OUTAGE_S / LOG_INTERVAL_S + 2), failed_lines
    assert all(outage_started - 1 <= line.at <= outage_ended + SPANS_TIMEOUT_S
               for line in full_lines + failed_lines)
    warn_count = sum(1 for line in log_lines(stderr) if line.level in ("WARN", "ERROR"))
    assert warn_count <= 15, f"{warn_count} warnings for {totals['dropped']} dropped spans"
    assert stopped_counts(stderr) == {f"spans_{k}": v for k, v in totals.items()}
    print(f"outage {OUTAGE_S:.0f} s at {OUTAGE_RATE:.0f} req/s over {protocol}: {totals}; "
          f"export resumed {resumed_after:.2f} s after the collector came back; agent RSS "
          f"{rss_before / 2**20:.1f} MiB before the outage, {first_full[3] / 2**20:.1f} MiB "
          f"when the queue filled, grew {rss_growth} B after; "
          f"{len(full_lines)} queue-full and {len(failed_lines)} export-failure warnings")


# ---- the collector answers too slowly -----------------------------------------------------------

REQUEST_TIMEOUT_MS = 300  # OTEL_EXPORTER_OTLP_TIMEOUT
SLOW_ANSWER_S = 2.0
EXPORT_TIMEOUT_MS = 3000  # OTEL_BSP_EXPORT_TIMEOUT: one batch, retries included
SLOW_BATCHES = 3
SLOW_BATCH = 20


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_slow_collector(collector_setup, protocol):
    """A collector that answers every export only after 2 s, with OTEL_EXPORTER_OTLP_TIMEOUT=300
    and OTEL_BSP_EXPORT_TIMEOUT=3000: each attempt is given up after 300 ms and retried within
    the batch's 3 s, then the batch counts as failed. Three batches fail within one log interval:
    one warning. When the collector is quick again, the next spans arrive.

    The receiver stores an export when it arrives, before its slow answer: so it holds spans the
    agent had to count as failed (the agent cannot know), and each attempt shows up there, which
    is how the attempts' spacing is measured.
    """
    setup = collector_setup(protocol, OTEL_EXPORTER_OTLP_TIMEOUT=str(REQUEST_TIMEOUT_MS),
                            OTEL_BSP_EXPORT_TIMEOUT=str(EXPORT_TIMEOUT_MS),
                            OTEL_BSP_MAX_EXPORT_BATCH_SIZE=str(SLOW_BATCH),
                            OTEL_BSP_SCHEDULE_DELAY="30000")  # only full batches go out
    receiver, agent, base = setup.receiver, setup.agent, setup.service.base_url
    receiver.response_delay_s = SLOW_ANSWER_S
    loads = []
    for batch in range(SLOW_BATCHES):
        started = time.monotonic()
        loads.append(run_load(base, 1 + batch * 100, SLOW_BATCH))
        # The batch is exported at once (it is full); wait for it to fail, then send the next.
        totals = wait_for(lambda: (span_totals(setup.scrape())["failed"]
                                   == (batch + 1) * SLOW_BATCH, span_totals(setup.scrape())),
                          EXPORT_TIMEOUT_MS / 1000 + 5)
        took = time.monotonic() - started
        assert took < EXPORT_TIMEOUT_MS / 1000 + 2, f"batch {batch} failed after {took:.1f} s"
    assert totals["exported"] == 0, totals

    # Every attempt reached the receiver (several per batch), never as far apart as the slow
    # answer: the agent gave up on each after its timeout instead of waiting for the answer.
    attempts = [r.received_ns / 1e9 for r in receiver.trace_requests()]
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    assert len(attempts) >= 2 * SLOW_BATCHES, attempts
    assert max(gaps) < SLOW_ANSWER_S, f"attempts {attempts}"

    receiver.response_delay_s = 0.0
    receiver.clear()
    after = run_load(base, 1001, SLOW_BATCH)
    spans = receiver.wait_for_spans(SLOW_BATCH, SPANS_TIMEOUT_S, diagnostics=agent.diagnostics)
    assert sorted(spans_by_item(receiver)) == sorted(after.ids) and len(spans) == SLOW_BATCH
    totals = setup.settled(SLOW_BATCH * (SLOW_BATCHES + 1))
    assert totals == {"created": 80, "sampled_out": 0, "exported": 20, "failed": 60,
                      "dropped": 0}, totals

    assert agent.stop() == 0, agent.diagnostics()
    # One line per kind: "timeout" (an attempt), and "export_timeout" if, on a busy machine, an
    # attempt was still running when the batch's OTEL_BSP_EXPORT_TIMEOUT ran out.
    lines = warnings_about(agent.stderr(), "export failed", what="spans")
    kinds = [line.field("kind") for line in lines]
    assert len(kinds) == len(set(kinds)) and set(kinds) <= {"timeout", "export_timeout"}, lines
    timeouts = [line for line in lines if line.field("kind") == "timeout"]
    assert len(timeouts) == 1, lines
    assert timeouts[0].field("error") == f"no response within {REQUEST_TIMEOUT_MS}ms", lines
    print(f"slow collector over {protocol}: {len(attempts)} attempts for {SLOW_BATCHES} batches, "
          f"spaced {min(gaps):.2f}..{max(gaps):.2f} s; warning: {timeouts[0].text}")


# ---- the collector rejects part of every export -------------------------------------------------

PARTIAL_BATCH = 10
PARTIAL_REJECT = 3


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_partial_success(collector_setup, protocol):
    """A collector that answers every export of 10 spans with a partial success rejecting 3 of
    them (ExportTraceServiceResponse.partial_success.rejected_spans = 3): the 3 count as failed,
    the 7 as exported, nothing is sent again (the spec forbids retrying a partial success), and
    the four exports within one log interval give one warning carrying the collector's message.
    """
    setup = collector_setup(protocol, OTEL_BSP_MAX_EXPORT_BATCH_SIZE=str(PARTIAL_BATCH),
                            OTEL_BSP_SCHEDULE_DELAY="30000")  # only full batches go out
    receiver, agent, base = setup.receiver, setup.agent, setup.service.base_url
    receiver.reject_spans, receiver.reject_message = PARTIAL_REJECT, "spans too old (test)"
    exports = 4
    load = run_load(base, 1, PARTIAL_BATCH * exports, rate=50)
    totals = setup.settled(len(load.sent))
    assert totals == {"created": 40, "sampled_out": 0, "exported": 28, "failed": 12,
                      "dropped": 0}, totals
    assert [r.rejected for r in receiver.trace_requests()] == [PARTIAL_REJECT] * exports
    assert sorted(spans_by_item(receiver)) == sorted(load.ids), "one export per span"

    assert agent.stop() == 0, agent.diagnostics()
    lines = warnings_about(agent.stderr(), "the collector rejected part of an export",
                           what="spans")
    assert len(lines) == 1, lines
    assert (lines[0].field("rejected"), lines[0].field("collector_message")) == \
        (str(PARTIAL_REJECT), "spans too old (test)"), lines[0]
    assert not warnings_about(agent.stderr(), "export failed"), "a partial success is no failure"
