"""Self-tests of the end-to-end harness: the OTLP receiver, the cgroup and service fixtures and the
agent fixture's start/stop logic (with a stand-in agent script). They need no tapwire binary, so
they pass before the agent exists and tell a harness bug from an agent bug afterwards.
"""

from __future__ import annotations

import gzip
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import requests
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

import cgroupfs
import procs
from http_clients import RequestsClient, TraceParent, curl_get
from otlp_receiver import OtlpReceiver, SpansTimeout

HERE = Path(__file__).resolve().parent

TRACE_ID = bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736")
SPAN_ID = bytes.fromhex("00f067aa0ba902b7")
PARENT_ID = bytes.fromhex("a3ce929d0e0e4736")


def kv(key, **value) -> common_pb2.KeyValue:
    return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(**value))


def trace_request(name: str = "GET", service: str = "harness-svc"
                  ) -> trace_service_pb2.ExportTraceServiceRequest:
    span = trace_pb2.Span(
        trace_id=TRACE_ID, span_id=SPAN_ID, parent_span_id=PARENT_ID, name=name,
        kind=trace_pb2.Span.SPAN_KIND_SERVER,
        start_time_unix_nano=1_700_000_000_000_000_000,
        end_time_unix_nano=1_700_000_000_012_500_000,
        attributes=[kv("http.request.method", string_value="GET"),
                    kv("http.response.status_code", int_value=500),
                    kv("sampled", bool_value=True),
                    kv("ratio", double_value=0.25),
                    kv("tags", array_value=common_pb2.ArrayValue(values=[
                        common_pb2.AnyValue(string_value="a"),
                        common_pb2.AnyValue(int_value=2)]))],
        status=trace_pb2.Status(code=trace_pb2.Status.STATUS_CODE_ERROR, message="boom"))
    return trace_service_pb2.ExportTraceServiceRequest(resource_spans=[trace_pb2.ResourceSpans(
        resource=resource_pb2.Resource(attributes=[kv("service.name", string_value=service),
                                                   kv("process.pid", int_value=4242)]),
        scope_spans=[trace_pb2.ScopeSpans(spans=[span])])])


def metrics_request() -> metrics_service_pb2.ExportMetricsServiceRequest:
    metric = metrics_pb2.Metric(name="tapwire.harness.count", sum=metrics_pb2.Sum(
        data_points=[metrics_pb2.NumberDataPoint(as_int=3)], is_monotonic=True))
    return metrics_service_pb2.ExportMetricsServiceRequest(resource_metrics=[
        metrics_pb2.ResourceMetrics(scope_metrics=[metrics_pb2.ScopeMetrics(metrics=[metric])])])


def assert_decoded_span(span: dict, transport: str) -> None:
    assert span == {
        **span,  # keys not listed here (indexes, events, ...) are checked elsewhere or unused
        "transport": transport,
        "service_name": "harness-svc",
        "resource": {"service.name": "harness-svc", "process.pid": 4242},
        "trace_id": TRACE_ID.hex(),
        "span_id": SPAN_ID.hex(),
        "parent_span_id": PARENT_ID.hex(),
        "name": "GET",
        "kind_name": "SERVER",
        "start_ns": 1_700_000_000_000_000_000,
        "end_ns": 1_700_000_000_012_500_000,
        "duration_ns": 12_500_000,
        "attributes": {"http.request.method": "GET", "http.response.status_code": 500,
                       "sampled": True, "ratio": 0.25, "tags": ["a", 2]},
        "status_name": "ERROR",
        "status_message": "boom",
    }
    assert type(span["attributes"]["http.response.status_code"]) is int


# ---- OTLP receiver ------------------------------------------------------------------------------

@pytest.fixture
def receiver():
    with OtlpReceiver() as r:
        yield r


def test_receiver_grpc_gzip_traces(receiver):
    with grpc.insecure_channel(f"127.0.0.1:{receiver.grpc_port}") as channel:
        stub = trace_service_pb2_grpc.TraceServiceStub(channel)
        reply = stub.Export(trace_request(), compression=grpc.Compression.Gzip, timeout=5)
        stub.Export(trace_request("POST"), timeout=5)  # uncompressed works too
    assert isinstance(reply, trace_service_pb2.ExportTraceServiceResponse)
    spans = receiver.wait_for_spans(2, timeout=5)
    assert len(spans) == 2
    assert_decoded_span(spans[0], "grpc")
    assert spans[1]["name"] == "POST"
    assert [r.transport for r in receiver.trace_requests()] == ["grpc", "grpc"]
    assert receiver.errors == []


@pytest.mark.parametrize("encoding", ["gzip", "identity"])
def test_receiver_http_protobuf_traces(receiver, encoding):
    body = trace_request().SerializeToString()
    headers = {"Content-Type": "application/x-protobuf"}
    if encoding == "gzip":
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    reply = requests.post(f"{receiver.http_endpoint}/v1/traces", data=body, headers=headers,
                          timeout=5)
    assert reply.status_code == 200, reply.text
    assert reply.headers["Content-Type"] == "application/x-protobuf"
    trace_service_pb2.ExportTraceServiceResponse.FromString(reply.content)
    spans = receiver.wait_for_spans(1, timeout=5)
    assert len(spans) == 1
    assert_decoded_span(spans[0], "http")
    assert receiver.trace_requests()[0].headers.get("content-encoding", "identity") == encoding


def test_receiver_http_chunked_body(receiver):
    body = gzip.compress(trace_request().SerializeToString())
    reply = requests.post(f"{receiver.http_endpoint}/v1/traces",
                          data=iter([body[:10], body[10:]]),  # an iterator is sent chunked
                          headers={"Content-Type": "application/x-protobuf",
                                   "Content-Encoding": "gzip"}, timeout=5)
    assert reply.status_code == 200, reply.text
    assert receiver.span_count() == 1


def test_receiver_http_rejects_wrong_content_type(receiver):
    reply = requests.post(f"{receiver.http_endpoint}/v1/traces", data=b"{}",
                          headers={"Content-Type": "application/json"}, timeout=5)
    assert reply.status_code == 415
    assert receiver.span_count() == 0
    assert len(receiver.errors) == 1 and "application/json" in receiver.errors[0]
    garbage = requests.post(f"{receiver.http_endpoint}/v1/traces", data=b"\xff\xff\xff",
                            headers={"Content-Type": "application/x-protobuf"}, timeout=5)
    assert garbage.status_code == 400
    assert len(receiver.errors) == 2


def test_receiver_metrics_over_both_transports(receiver):
    with grpc.insecure_channel(f"127.0.0.1:{receiver.grpc_port}") as channel:
        metrics_service_pb2_grpc.MetricsServiceStub(channel).Export(
            metrics_request(), compression=grpc.Compression.Gzip, timeout=5)
    reply = requests.post(f"{receiver.http_endpoint}/v1/metrics",
                          data=gzip.compress(metrics_request().SerializeToString()),
                          headers={"Content-Type": "application/x-protobuf",
                                   "Content-Encoding": "gzip"}, timeout=5)
    assert reply.status_code == 200
    stored = receiver.metric_requests()
    assert [r.transport for r in stored] == ["grpc", "http"]
    for r in stored:
        metric = r.message.resource_metrics[0].scope_metrics[0].metrics[0]
        assert (metric.name, metric.sum.data_points[0].as_int) == ("tapwire.harness.count", 3)
    assert receiver.span_count() == 0


def test_receiver_keeps_raw_bytes(receiver):
    body = trace_request().SerializeToString()
    with grpc.insecure_channel(f"127.0.0.1:{receiver.grpc_port}") as channel:
        trace_service_pb2_grpc.TraceServiceStub(channel).Export(
            trace_request(), compression=grpc.Compression.Gzip, timeout=5)
    requests.post(f"{receiver.http_endpoint}/v1/traces", data=gzip.compress(body),
                  headers={"Content-Type": "application/x-protobuf",
                           "Content-Encoding": "gzip"}, timeout=5).raise_for_status()
    assert [r.raw for r in receiver.trace_requests()] == [body, body]


def test_receiver_down_and_back_on_the_same_ports(receiver):
    grpc_port, http_port = receiver.grpc_port, receiver.http_port
    session = requests.Session()  # a kept-alive connection must not outlive the stop
    post = lambda: session.post(f"{receiver.http_endpoint}/v1/traces",  # noqa: E731
                                data=trace_request().SerializeToString(),
                                headers={"Content-Type": "application/x-protobuf"}, timeout=5)
    assert post().status_code == 200
    receiver.stop()
    with pytest.raises(requests.ConnectionError):
        post()
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        with pytest.raises(grpc.RpcError) as raised:
            trace_service_pb2_grpc.TraceServiceStub(channel).Export(trace_request(), timeout=2)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    receiver.start()
    assert (receiver.grpc_port, receiver.http_port) == (grpc_port, http_port)
    assert post().status_code == 200
    assert receiver.span_count() == 2, "what was received before the outage is kept"


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_receiver_partial_success_and_slow_answers(receiver, transport):
    receiver.reject_spans, receiver.reject_message = 5, "harness rejects"
    receiver.response_delay_s = 0.5
    two_spans = trace_request()
    two_spans.resource_spans[0].scope_spans[0].spans.append(
        two_spans.resource_spans[0].scope_spans[0].spans[0])
    started = time.monotonic()
    if transport == "grpc":
        with grpc.insecure_channel(f"127.0.0.1:{receiver.grpc_port}") as channel:
            reply = trace_service_pb2_grpc.TraceServiceStub(channel).Export(two_spans, timeout=5)
    else:
        answer = requests.post(f"{receiver.http_endpoint}/v1/traces",
                               data=two_spans.SerializeToString(),
                               headers={"Content-Type": "application/x-protobuf"}, timeout=5)
        reply = trace_service_pb2.ExportTraceServiceResponse.FromString(answer.content)
    assert time.monotonic() - started >= 0.5
    assert (reply.partial_success.rejected_spans, reply.partial_success.error_message) == \
        (2, "harness rejects"), "rejected: at most the spans of the request"
    assert [r.rejected for r in receiver.trace_requests()] == [2]
    # Stored on arrival, before the slow answer; a client that gives up still delivered it.
    receiver.response_delay_s = 2.0
    if transport == "grpc":
        with grpc.insecure_channel(f"127.0.0.1:{receiver.grpc_port}") as channel:
            with pytest.raises(grpc.RpcError) as raised:
                trace_service_pb2_grpc.TraceServiceStub(channel).Export(two_spans, timeout=0.3)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    else:
        with pytest.raises(requests.Timeout):
            requests.post(f"{receiver.http_endpoint}/v1/traces",
                          data=two_spans.SerializeToString(),
                          headers={"Content-Type": "application/x-protobuf"}, timeout=0.3)
    assert len(receiver.trace_requests()) == 2


def test_receiver_exporter_env(receiver):
    assert receiver.exporter_env("grpc") == {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.grpc_port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_BSP_SCHEDULE_DELAY": "200"}
    assert receiver.exporter_env("http/protobuf")["OTEL_EXPORTER_OTLP_ENDPOINT"] == \
        f"http://127.0.0.1:{receiver.http_port}"


def test_wait_for_spans_times_out_readably(receiver):
    started = time.monotonic()
    with pytest.raises(SpansTimeout) as raised:
        receiver.wait_for_spans(3, timeout=0.5, diagnostics=lambda: "AGENT STDERR TAIL")
    assert time.monotonic() - started < 2
    message = str(raised.value)
    assert "for 3 spans, received 0" in message and "AGENT STDERR TAIL" in message


def test_receiver_standalone_prints_spans(tmp_path):
    grpc_port, http_port = procs.free_port(), procs.free_port()
    log = tmp_path / "receiver.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(HERE / "otlp_receiver.py"),
                                 "--grpc-port", str(grpc_port), "--http-port", str(http_port)],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        sent = False
        while time.monotonic() < deadline and not sent:
            try:
                reply = requests.post(f"http://127.0.0.1:{http_port}/v1/traces",
                                      data=trace_request().SerializeToString(),
                                      headers={"Content-Type": "application/x-protobuf"},
                                      timeout=2)
                sent = reply.status_code == 200
            except requests.ConnectionError:
                time.sleep(0.1)
        assert sent, log.read_text()
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            trace_service_pb2_grpc.TraceServiceStub(channel).Export(
                trace_request("PUT"), compression=grpc.Compression.Gzip, timeout=5)
        deadline = time.monotonic() + 5
        while "'PUT'" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        text = log.read_text()
        assert "[http] SERVER 'GET' service='harness-svc'" in text, text
        assert "[grpc] SERVER 'PUT' service='harness-svc'" in text, text
        assert f"trace={TRACE_ID.hex()} span={SPAN_ID.hex()} parent={PARENT_ID.hex()}" in text
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0


# ---- cgroups --------------------------------------------------------------------------------------

def test_cgroup2_mount_is_found():
    root = cgroupfs.cgroup2_mount()
    assert (root / "cgroup.procs").exists()
    assert any(line.split()[1:3] == [str(root), "cgroup2"]
               for line in Path("/proc/self/mounts").read_text().splitlines())


def test_cgroup_fixture_process_joins_before_exec(cgroup, start_in_cgroup, cgroup2_root):
    cg = cgroup("harness")
    assert cg.parent == cgroup2_root and cg.name == f"tapwire-e2e-harness-{os.getpid()}"
    assert cg.is_dir() and cgroupfs.procs(cg) == []
    proc = start_in_cgroup(cg, ["sleep", "30"])
    deadline = time.monotonic() + 5
    while Path(f"/proc/{proc.pid}/comm").read_text().strip() != "sleep":
        assert time.monotonic() < deadline, "the wrapper never exec'd sleep"
        time.sleep(0.02)
    assert cgroupfs.procs(cg) == [proc.pid]  # same pid as the wrapper: it exec'd in place
    assert cgroupfs.cgroup_of(proc.pid) == "/" + cg.name
    assert cgroupfs.cgroup_of(os.getpid()) != "/" + cg.name  # the test itself stays outside


def test_cgroup_remove_kills_tree_and_rmdirs(cgroup2_root):
    cg = cgroupfs.create(f"tapwire-e2e-harness-rm-{os.getpid()}", cgroup2_root)
    try:
        child = cgroupfs.create("child", cg)
        a = cgroupfs.popen_in_cgroup(cg, ["sleep", "60"])
        # A process whose own child (the inner sleep) is in the child cgroup.
        b = cgroupfs.popen_in_cgroup(child, ["sh", "-c", "sleep 60 & wait"])
        deadline = time.monotonic() + 5
        while len(cgroupfs.procs(child)) < 2 or not cgroupfs.procs(cg):
            assert time.monotonic() < deadline, (cgroupfs.procs(cg), cgroupfs.procs(child))
            time.sleep(0.02)
        pids = cgroupfs.procs(cg) + cgroupfs.procs(child)
    finally:
        cgroupfs.remove(cg)
    assert not cg.exists()
    assert a.wait(5) == -signal.SIGKILL and b.wait(5) == -signal.SIGKILL
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z", f"pid {pid} survived"


def test_cgroup_create_replaces_leftover(cgroup2_root):
    name = f"tapwire-e2e-harness-leftover-{os.getpid()}"
    first = cgroupfs.create(name, cgroup2_root)
    try:
        cgroupfs.popen_in_cgroup(first, ["sleep", "60"])
        second = cgroupfs.create(name, cgroup2_root)  # a crashed run left one behind
        assert second == first and cgroupfs.procs(second) == []
    finally:
        cgroupfs.remove(first)


# ---- services and clients -------------------------------------------------------------------------

def test_fastapi_service_in_cgroup_with_both_clients(cgroup, fastapi_service):
    cg = cgroup("harness-app")
    service = fastapi_service(cg, env={"OTEL_SERVICE_NAME": "harness-api"})
    outside = fastapi_service(None, label="outside")
    assert cgroupfs.procs(cg) == [service.pid]
    assert cgroupfs.cgroup_of(outside.pid) == cgroupfs.cgroup_of(os.getpid())
    environ = Path(f"/proc/{service.pid}/environ").read_bytes().split(b"\0")
    assert b"OTEL_SERVICE_NAME=harness-api" in environ
    assert procs.exe_name(service.pid).startswith("python")

    traceparent = TraceParent.random()
    assert traceparent.header == f"00-{traceparent.trace_id}-{traceparent.parent_id}-01"
    item = curl_get(f"{service.base_url}/items/7?delay_ms=20", "harness-curl", traceparent)
    assert (item.status, item.body["id"], item.delay_ms, item.path) == (200, 7, 20, "/items/7")
    assert item.handler_ns >= 20_000_000
    assert item.client_ns >= item.handler_ns
    assert 0 < item.local_port < 65536 and item.local_port != service.port

    client = RequestsClient()
    try:
        failed = client.get(f"{service.base_url}/fail?delay_ms=10", "harness-requests")
        again = client.get(f"{service.base_url}/hello", "harness-requests")
    finally:
        client.close()
    assert (failed.status, failed.delay_ms, failed.path) == (500, 10, "/fail")
    assert failed.handler_ns >= 10_000_000 and failed.client_ns >= failed.handler_ns
    assert again.status == 200 and again.body["hello"] == "world"
    assert again.local_port == failed.local_port  # keep-alive: one connection for both
    assert failed.wall_start_ns <= failed.wall_end_ns <= again.wall_start_ns


# ---- the agent fixture, with a stand-in agent ------------------------------------------------------

FAKE_AGENT = """#!/bin/sh
# Stand-in for tapwire: logs like it, exits 0 on SIGTERM (or as told by FAKE_MODE).
echo "fake tapwire argv: $*" >&2
echo "endpoint=${OTEL_EXPORTER_OTLP_ENDPOINT:-none} service=${OTEL_SERVICE_NAME:-none}" >&2
case "$FAKE_MODE" in
  exit-early) echo "error: cannot attach sys_enter_read" >&2; exit 3 ;;
  never-ready) trap '' TERM; while :; do sleep 0.1; done ;;
  ignore-term) trap '' TERM ;;
  *) trap 'echo "SERVER GET flushed" ; exit 0' TERM ;;
esac
echo "INFO capture ready cgroups=$#" >&2
while :; do sleep 0.1; done
"""


@pytest.fixture
def tapwire_bin(tmp_path) -> str:
    """Overrides the real binary for this module only."""
    path = tmp_path / "fake-tapwire"
    path.write_text(FAKE_AGENT)
    path.chmod(0o755)
    return str(path)


def test_tapwire_fixture_waits_for_ready_and_stops(tapwire, monkeypatch, otlp_receiver):
    monkeypatch.setenv("OTEL_SERVICE_NAME", "leaked-from-outside")
    agent = tapwire(["/sys/fs/cgroup/a", "b"], env=otlp_receiver.exporter_env("grpc"))
    assert agent.running()
    stderr = agent.stderr()
    assert "fake tapwire argv: run --cgroup /sys/fs/cgroup/a --cgroup b" in stderr
    assert f"endpoint={otlp_receiver.grpc_endpoint} service=none" in stderr  # OTEL_* scrubbed
    assert agent.stop() == 0
    assert agent.stdout() == "SERVER GET flushed\n"


def test_tapwire_process_reports_early_exit(tapwire_bin, tmp_path):
    agent = procs.TapwireProcess(tapwire_bin, ["x"], procs.base_env({"FAKE_MODE": "exit-early"}),
                                 tmp_path)
    with pytest.raises(AssertionError) as raised:
        agent.start()
    message = str(raised.value)
    assert "exited with code 3 before logging 'capture ready'" in message
    assert "error: cannot attach sys_enter_read" in message  # the stderr is in the failure


def test_tapwire_process_times_out_and_kills(tapwire_bin, tmp_path):
    agent = procs.TapwireProcess(tapwire_bin, ["x"], procs.base_env({"FAKE_MODE": "never-ready"}),
                                 tmp_path)
    with pytest.raises(AssertionError, match="did not log 'capture ready' within 1s"):
        agent.start(ready_timeout=1)
    assert not agent.running()


def test_tapwire_process_stop_fails_on_hang(tapwire_bin, tmp_path):
    agent = procs.TapwireProcess(tapwire_bin, ["x"], procs.base_env({"FAKE_MODE": "ignore-term"}),
                                 tmp_path).start()
    with pytest.raises(AssertionError, match="did not exit within 1s of SIGTERM"):
        agent.stop(timeout=1)
    assert not agent.running()


def test_free_port_is_bindable():
    port = procs.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


# ---- the foundation test's own checks, against spans synthesised from real exchanges ----------

def ideal_spans_request(exchanges, service, service_name: str, mutate=None):
    """The OTLP request a correct agent would send for `exchanges` (see test_foundation)."""
    spans = []
    for exchange in exchanges:
        duration = (exchange.handler_ns + exchange.client_ns) // 2
        trace_id = exchange.traceparent.trace_id if exchange.traceparent else os.urandom(16).hex()
        route = re.sub(r"^/items/\d+$", "/items/{id}", exchange.path)
        attrs = [kv("http.request.method", string_value="GET"),
                 kv("url.path", string_value=exchange.path),
                 kv("http.route", string_value=route),
                 kv("url.scheme", string_value="http"),
                 kv("http.response.status_code", int_value=exchange.status),
                 kv("server.port", int_value=service.port),
                 kv("client.address", string_value="127.0.0.1"),
                 kv("network.peer.address", string_value="127.0.0.1"),
                 kv("network.peer.port", int_value=exchange.local_port),
                 kv("network.protocol.version", string_value="1.1"),
                 kv("user_agent.original", string_value=exchange.user_agent)]
        error = exchange.status >= 500
        if error:
            attrs.append(kv("error.type", string_value=str(exchange.status)))
        spans.append(trace_pb2.Span(
            trace_id=bytes.fromhex(trace_id), span_id=os.urandom(8),
            parent_span_id=bytes.fromhex(exchange.traceparent.parent_id)
            if exchange.traceparent else b"",
            name=f"GET {route}", kind=trace_pb2.Span.SPAN_KIND_SERVER,
            start_time_unix_nano=exchange.wall_start_ns,
            end_time_unix_nano=exchange.wall_start_ns + duration, attributes=attrs,
            status=trace_pb2.Status(code=trace_pb2.Status.STATUS_CODE_ERROR if error
                                    else trace_pb2.Status.STATUS_CODE_UNSET)))
    if mutate is not None:
        mutate(spans)
    resource = [kv("service.name", string_value=service_name),
                kv("process.pid", int_value=service.pid),
                kv("process.executable.name", string_value=procs.exe_name(service.pid)),
                kv("host.name", string_value=socket.gethostname()),
                kv("service.instance.id", string_value="harness-instance"),
                kv("telemetry.sdk.name", string_value="tapwire")]
    return trace_service_pb2.ExportTraceServiceRequest(resource_spans=[trace_pb2.ResourceSpans(
        resource=resource_pb2.Resource(attributes=resource),
        scope_spans=[trace_pb2.ScopeSpans(spans=spans)])])


class _NoAgent:
    @staticmethod
    def diagnostics() -> str:
        return "(no agent in this self-test)"


def test_foundation_checks_accept_right_spans_and_reject_wrong_ones(cgroup, fastapi_service):
    import test_foundation as tf

    service = fastapi_service(cgroup("harness-checks"), label="checks")
    plan = [tf.Planned(0, "curl", "/items/1?delay_ms=5", False),
            tf.Planned(1, "requests", "/items/2?delay_ms=7", True),
            tf.Planned(2, "curl", "/fail?delay_ms=5", True),
            tf.Planned(3, "requests", "/fail?delay_ms=6", False),
            tf.Planned(4, "curl", "/hello", False),
            tf.Planned(5, "requests", "/hello", True)]
    exchanges, _ = tf.run_plan(plan, service)

    def run(mutate=None, service_name="svc"):
        with OtlpReceiver() as receiver:
            with grpc.insecure_channel(f"127.0.0.1:{receiver.grpc_port}") as channel:
                trace_service_pb2_grpc.TraceServiceStub(channel).Export(
                    ideal_spans_request(exchanges, service, service_name, mutate), timeout=5)
            spans = receiver.wait_for_spans(len(exchanges) if mutate is None else 1, 5)
            tf.check_run(receiver, _NoAgent, spans, exchanges, service, "svc")

    run()  # what a correct agent sends passes

    def set_int(index, key, value):
        def mutate(spans):
            for a in spans[index].attributes:
                if a.key == key:
                    a.value.int_value = value
        return mutate

    def set_str(index, key, value):
        def mutate(spans):
            for a in spans[index].attributes:
                if a.key == key:
                    a.value.string_value = value
        return mutate

    def drop_parent(spans):
        spans[1].parent_span_id = b""

    def too_long(spans):
        spans[0].end_time_unix_nano += 10_000_000_000

    def too_short(spans):
        spans[1].end_time_unix_nano = spans[1].start_time_unix_nano + 1_000_000

    def boot_time(spans):
        spans[4].start_time_unix_nano -= 1_700_000_000_000_000_000
        spans[4].end_time_unix_nano -= 1_700_000_000_000_000_000

    def unset_error(spans):
        spans[3].status.code = trace_pb2.Status.STATUS_CODE_UNSET

    def extra_span(spans):
        spans.append(trace_pb2.Span(trace_id=os.urandom(16), span_id=os.urandom(8), name="GET"))

    def string_status(spans):
        for a in spans[0].attributes:
            if a.key == "http.response.status_code":
                a.value.string_value = "200"

    cases = [
        (set_int(0, "http.response.status_code", 201), "http.response.status_code=201"),
        (string_status, "http.response.status_code='200', expected 200"),
        (set_str(0, "url.path", "/items/1?delay_ms=5"), "unexpected url.path '/items/1?delay_ms=5'"),
        (set_int(2, "network.peer.port", 1), "network.peer.port=1"),
        (drop_parent, "parent span id (none), expected the traceparent's"),
        (too_long, "> client-measured"),
        (too_short, "< handler time"),
        (boot_time, "outside the client's wall-clock window"),
        (unset_error, "status UNSET, expected ERROR"),
        (extra_span, "7 spans for 6 requests"),
    ]
    for mutate, expected in cases:
        with pytest.raises(AssertionError) as raised:
            run(mutate)
        assert expected in str(raised.value), f"{mutate}: {raised.value}"
    with pytest.raises(AssertionError, match="resource service.name='other', expected 'svc'"):
        run(service_name="other")
