"""An independent OTLP receiver for tapwire's end-to-end tests.

Built only on the official `opentelemetry-proto` messages and `grpcio`, so it shares no code with
the agent it checks. It serves:

- OTLP/gRPC: TraceService and MetricsService on 127.0.0.1 (gzip-compressed requests are
  decompressed by grpcio itself);
- OTLP/HTTP with protobuf bodies: POST /v1/traces and /v1/metrics, `Content-Type:
  application/x-protobuf`, optional `Content-Encoding: gzip`.

Every decoded request is stored, with the protobuf bytes it arrived as (`Received.raw`, after
gRPC or HTTP decompression). `spans()` flattens the stored trace requests into plain dicts and
`wait_for_spans()` blocks (bounded) until a number of spans arrived. `metric_points()` flattens
the stored metric requests into one dict per data point and `latest_metric_points()` keeps the
newest point of each stream (what a cumulative metric stands at).

Switches for collector trouble, changed at any time: `stop()` then `start()` is a collector that
goes down and comes back on the same ports; `response_delay_s` answers every export that much
later (a slow collector: the request is stored on arrival, the answer waits); `reject_spans` (with
`reject_message`) answers each trace export with an OTLP partial success rejecting that many of
its spans (at most all of them), as `ExportTracePartialSuccess.rejected_spans`.

Standalone, for manual runs against a locally started agent:

    python tests/e2e/otlp_receiver.py --grpc-port 4317 --http-port 4318

prints one line per received span until interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import http.server
import json
import socket
import sys
import threading
import time
import zlib
from concurrent import futures
from typing import Any, Callable

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

PROTOBUF_CONTENT_TYPE = "application/x-protobuf"

SPAN_KIND_NAMES = {
    trace_pb2.Span.SPAN_KIND_UNSPECIFIED: "UNSPECIFIED",
    trace_pb2.Span.SPAN_KIND_INTERNAL: "INTERNAL",
    trace_pb2.Span.SPAN_KIND_SERVER: "SERVER",
    trace_pb2.Span.SPAN_KIND_CLIENT: "CLIENT",
    trace_pb2.Span.SPAN_KIND_PRODUCER: "PRODUCER",
    trace_pb2.Span.SPAN_KIND_CONSUMER: "CONSUMER",
}
STATUS_CODE_NAMES = {
    trace_pb2.Status.STATUS_CODE_UNSET: "UNSET",
    trace_pb2.Status.STATUS_CODE_OK: "OK",
    trace_pb2.Status.STATUS_CODE_ERROR: "ERROR",
}


@dataclasses.dataclass
class Received:
    """One decoded export request, as it arrived."""

    transport: str  # "grpc" or "http"
    signal: str  # "traces" or "metrics"
    message: Any  # ExportTraceServiceRequest or ExportMetricsServiceRequest
    headers: dict[str, str]  # HTTP headers, or gRPC invocation metadata
    received_ns: int
    raw: bytes = b""  # the protobuf bytes as received (decompressed)
    rejected: int = 0  # spans this receiver answered as rejected (partial success)


def any_value(value: common_pb2.AnyValue) -> Any:
    """Converts an OTLP AnyValue to the matching Python value (None when unset)."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, kind)


def attributes(kvs) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in kvs}


def flatten_trace_request(request: trace_service_pb2.ExportTraceServiceRequest,
                          transport: str = "", request_index: int = -1) -> list[dict[str, Any]]:
    """One dict per span, carrying its resource and scope with it."""
    spans = []
    for rs_index, resource_spans in enumerate(request.resource_spans):
        resource = attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append({
                    "transport": transport,
                    "request_index": request_index,
                    "resource_spans_index": rs_index,
                    "service_name": resource.get("service.name"),
                    "resource": resource,
                    "scope_name": scope_spans.scope.name,
                    "scope_version": scope_spans.scope.version,
                    "trace_id": span.trace_id.hex(),
                    "span_id": span.span_id.hex(),
                    "parent_span_id": span.parent_span_id.hex(),
                    "trace_state": span.trace_state,
                    "flags": span.flags,
                    "name": span.name,
                    "kind": span.kind,
                    "kind_name": SPAN_KIND_NAMES.get(span.kind, str(span.kind)),
                    "start_ns": span.start_time_unix_nano,
                    "end_ns": span.end_time_unix_nano,
                    "duration_ns": span.end_time_unix_nano - span.start_time_unix_nano,
                    "attributes": attributes(span.attributes),
                    "dropped_attributes_count": span.dropped_attributes_count,
                    "events": [{"name": e.name, "time_ns": e.time_unix_nano,
                                "attributes": attributes(e.attributes)} for e in span.events],
                    "links": [{"trace_id": link.trace_id.hex(), "span_id": link.span_id.hex()}
                              for link in span.links],
                    "status_code": span.status.code,
                    "status_name": STATUS_CODE_NAMES.get(span.status.code, str(span.status.code)),
                    "status_message": span.status.message,
                })
    return spans


TEMPORALITY_NAMES = {
    metrics_pb2.AGGREGATION_TEMPORALITY_UNSPECIFIED: "UNSPECIFIED",
    metrics_pb2.AGGREGATION_TEMPORALITY_DELTA: "DELTA",
    metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE: "CUMULATIVE",
}


def flatten_metrics_request(request: metrics_service_pb2.ExportMetricsServiceRequest,
                            transport: str = "", request_index: int = -1) -> list[dict[str, Any]]:
    """One dict per data point, carrying its metric, resource and scope with it.

    Every point has: transport, request_index, service_name, resource, scope_name, name, unit,
    description, type ("sum" | "gauge" | "histogram" | "exponential_histogram" | "summary"),
    temporality (name, "" for gauges), monotonic (sums only, else None), attributes, start_ns,
    time_ns. Sums and gauges add `value` (int or float); histograms add count, sum, min, max
    (None when absent), explicit_bounds and bucket_counts (per bucket, as sent: not cumulative).
    """
    points = []
    for resource_metrics in request.resource_metrics:
        resource = attributes(resource_metrics.resource.attributes)
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                kind = metric.WhichOneof("data")
                data = getattr(metric, kind) if kind else None
                base = {
                    "transport": transport,
                    "request_index": request_index,
                    "service_name": resource.get("service.name"),
                    "resource": resource,
                    "scope_name": scope_metrics.scope.name,
                    "name": metric.name,
                    "unit": metric.unit,
                    "description": metric.description,
                    "type": kind,
                    "temporality": "" if kind == "gauge" else TEMPORALITY_NAMES.get(
                        getattr(data, "aggregation_temporality", 0), "?"),
                    "monotonic": data.is_monotonic if kind == "sum" else None,
                }
                for point in (data.data_points if data is not None else []):
                    out = dict(base, attributes=attributes(point.attributes),
                               start_ns=point.start_time_unix_nano, time_ns=point.time_unix_nano)
                    if kind in ("sum", "gauge"):
                        which = point.WhichOneof("value")
                        out["value"] = getattr(point, which) if which else None
                    elif kind == "histogram":
                        out.update(count=point.count,
                                   sum=point.sum if point.HasField("sum") else None,
                                   min=point.min if point.HasField("min") else None,
                                   max=point.max if point.HasField("max") else None,
                                   explicit_bounds=list(point.explicit_bounds),
                                   bucket_counts=list(point.bucket_counts))
                    else:
                        out["raw"] = point
                    points.append(out)
    return points


def metric_stream_key(point: dict[str, Any]) -> tuple:
    """Identifies a metric stream: resource, scope, metric name and attribute set."""
    def frozen(attrs: dict[str, Any]) -> tuple:
        return tuple(sorted((k, repr(v)) for k, v in attrs.items()))
    return (frozen(point["resource"]), point["scope_name"], point["name"],
            frozen(point["attributes"]))


def format_span(span: dict[str, Any]) -> str:
    """One human-readable line per span (used by the standalone mode and in failure messages)."""
    attrs = " ".join(f"{k}={v!r}" for k, v in sorted(span["attributes"].items()))
    return (f"[{span['transport']}] {span['kind_name']} {span['name']!r} "
            f"service={span['service_name']!r} trace={span['trace_id']} span={span['span_id']} "
            f"parent={span['parent_span_id'] or '-'} dur={span['duration_ns'] / 1e6:.3f}ms "
            f"status={span['status_name']} {attrs}")


class SpansTimeout(AssertionError):
    """Raised by wait_for_spans; an AssertionError so pytest shows it as a test failure."""


class OtlpReceiver:
    """OTLP/gRPC + OTLP/HTTP(protobuf) receiver on 127.0.0.1 that stores what it decodes."""

    def __init__(self, host: str = "127.0.0.1", grpc_port: int = 0, http_port: int = 0,
                 on_receive: Callable[[Received], None] | None = None):
        self.host = host
        self._requested_grpc_port = grpc_port
        self._requested_http_port = http_port
        self._on_receive = on_receive
        self._cond = threading.Condition()
        self._received: list[Received] = []
        self._errors: list[str] = []
        self._grpc_server: grpc.Server | None = None
        self._http_server: http.server.ThreadingHTTPServer | None = None
        self._http_thread: threading.Thread | None = None
        self._http_connections: set[socket.socket] = set()  # open, closed by stop()
        self.grpc_port = 0
        self.http_port = 0
        # Collector trouble (see the module docstring); read on every export.
        self.response_delay_s = 0.0
        self.reject_spans = 0
        self.reject_message = ""

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> "OtlpReceiver":
        """Starts serving; after stop(), on the same ports as before (what was received is
        kept)."""
        grpc_port = self.grpc_port or self._requested_grpc_port
        http_port = self.http_port or self._requested_http_port
        self._grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self._grpc_server.add_generic_rpc_handlers(_grpc_handlers(self))
        self.grpc_port = self._grpc_server.add_insecure_port(f"{self.host}:{grpc_port}")
        if self.grpc_port == 0:
            raise RuntimeError(f"cannot bind the OTLP/gRPC port {grpc_port}")
        self._grpc_server.start()

        self._http_server = http.server.ThreadingHTTPServer(
            (self.host, http_port), _make_http_handler(self))
        self._http_server.daemon_threads = True
        self.http_port = self._http_server.server_address[1]
        self._http_thread = threading.Thread(target=self._http_server.serve_forever,
                                             args=(0.05,), name="otlp-http", daemon=True)
        self._http_thread.start()
        return self

    def stop(self) -> None:
        """Stops serving and closes every connection, as a collector going down does."""
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_server = None
            with self._cond:
                connections, self._http_connections = self._http_connections, set()
            for conn in connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed by its client
        if self._grpc_server is not None:
            self._grpc_server.stop(grace=1).wait(5)
            self._grpc_server = None

    def __enter__(self) -> "OtlpReceiver":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- addresses ---------------------------------------------------------------------------

    @property
    def grpc_endpoint(self) -> str:
        return f"http://{self.host}:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def endpoint(self, protocol: str) -> str:
        """The base endpoint for OTEL_EXPORTER_OTLP_ENDPOINT for `grpc` or `http/protobuf`."""
        if protocol == "grpc":
            return self.grpc_endpoint
        if protocol == "http/protobuf":
            return self.http_endpoint
        raise ValueError(f"unknown OTLP protocol {protocol!r}")

    def exporter_env(self, protocol: str, schedule_delay_ms: int = 200) -> dict[str, str]:
        """The standard OTEL_* variables pointing an exporter at this receiver."""
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint(protocol),
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_BSP_SCHEDULE_DELAY": str(schedule_delay_ms),
        }

    # ---- storage -----------------------------------------------------------------------------

    def _store(self, received: Received) -> None:
        with self._cond:
            self._received.append(received)
            self._cond.notify_all()
        if self._on_receive is not None:
            self._on_receive(received)

    def _answer(self, received: Received, response_type):
        """Stores an export and builds its answer, as the collector switches say."""
        response = response_type()
        if received.signal == "traces" and self.reject_spans > 0:
            count = sum(len(ss.spans) for rs in received.message.resource_spans
                        for ss in rs.scope_spans)
            received.rejected = min(self.reject_spans, count)
            response.partial_success.rejected_spans = received.rejected
            response.partial_success.error_message = self.reject_message
        self._store(received)
        if self.response_delay_s > 0:
            time.sleep(self.response_delay_s)
        return response

    def _error(self, message: str) -> None:
        with self._cond:
            self._errors.append(message)
            self._cond.notify_all()
        if self._on_receive is not None:
            print(f"otlp receiver: {message}", file=sys.stderr, flush=True)

    @property
    def errors(self) -> list[str]:
        """Requests the receiver rejected (bad content type, undecodable body, ...)."""
        with self._cond:
            return list(self._errors)

    def received(self, signal: str | None = None) -> list[Received]:
        with self._cond:
            return [r for r in self._received if signal is None or r.signal == signal]

    def trace_requests(self) -> list[Received]:
        return self.received("traces")

    def metric_requests(self) -> list[Received]:
        return self.received("metrics")

    def clear(self) -> None:
        with self._cond:
            self._received.clear()
            self._errors.clear()

    def spans(self) -> list[dict[str, Any]]:
        """Every received span, flattened, in arrival order."""
        out = []
        for index, req in enumerate(self.trace_requests()):
            out.extend(flatten_trace_request(req.message, req.transport, index))
        return out

    def metric_points(self) -> list[dict[str, Any]]:
        """Every received metric data point, flattened (flatten_metrics_request), in arrival
        order."""
        out = []
        for index, req in enumerate(self.metric_requests()):
            out.extend(flatten_metrics_request(req.message, req.transport, index))
        return out

    def latest_metric_points(self, name: str | None = None) -> list[dict[str, Any]]:
        """The newest point (by time_ns, then arrival) of every metric stream, optionally of one
        metric `name`: for cumulative metrics, the current totals."""
        latest: dict[tuple, dict[str, Any]] = {}
        for point in self.metric_points():
            if name is not None and point["name"] != name:
                continue
            key = metric_stream_key(point)
            if key not in latest or point["time_ns"] >= latest[key]["time_ns"]:
                latest[key] = point
        return list(latest.values())

    def span_count(self) -> int:
        with self._cond:
            return self._span_count_locked()

    def _span_count_locked(self) -> int:
        return sum(len(ss.spans)
                   for r in self._received if r.signal == "traces"
                   for rs in r.message.resource_spans
                   for ss in rs.scope_spans)

    def wait_for_spans(self, count: int, timeout: float, settle: float = 0.0,
                       diagnostics: Callable[[], str] | None = None) -> list[dict[str, Any]]:
        """Waits until at least `count` spans arrived, then `settle` seconds more for extras.

        Returns every span received (possibly more than `count`: callers assert the exact
        number). Raises SpansTimeout, with the spans seen so far and `diagnostics()` (e.g. the
        agent's stderr tail), when fewer than `count` arrived within `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._span_count_locked() < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, 0.5))
            got = self._span_count_locked()
        if got < count:
            raise SpansTimeout(self.describe(
                f"waited {timeout:.0f}s for {count} spans, received {got}", diagnostics))
        if settle > 0:
            time.sleep(settle)
        return self.spans()

    def describe(self, headline: str, diagnostics: Callable[[], str] | None = None,
                 max_spans: int = 60) -> str:
        """A readable report of what arrived, for assertion messages."""
        spans = self.spans()
        lines = [headline,
                 f"receiver: {len(self.trace_requests())} trace requests, "
                 f"{len(self.metric_requests())} metric requests, {len(spans)} spans"]
        lines += [f"  {format_span(s)}" for s in spans[:max_spans]]
        if len(spans) > max_spans:
            lines.append(f"  ... {len(spans) - max_spans} more")
        if self.errors:
            lines.append("receiver rejected requests:")
            lines += [f"  {e}" for e in self.errors]
        if diagnostics is not None:
            lines.append(diagnostics())
        return "\n".join(lines)


def _grpc_handlers(receiver: OtlpReceiver) -> tuple[grpc.GenericRpcHandler, ...]:
    """TraceService/Export and MetricsService/Export, deserialised here so that the raw request
    bytes are kept."""

    def export(signal: str, request_type, response_type) -> grpc.RpcMethodHandler:
        def behaviour(raw_and_request, context):
            raw, request = raw_and_request
            return receiver._answer(
                Received("grpc", signal, request, _metadata(context), time.time_ns(), raw),
                response_type)

        return grpc.unary_unary_rpc_method_handler(
            behaviour,
            request_deserializer=lambda raw: (raw, request_type.FromString(raw)),
            response_serializer=response_type.SerializeToString)

    return (
        grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService",
            {"Export": export("traces", trace_service_pb2.ExportTraceServiceRequest,
                              trace_service_pb2.ExportTraceServiceResponse)}),
        grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.metrics.v1.MetricsService",
            {"Export": export("metrics", metrics_service_pb2.ExportMetricsServiceRequest,
                              metrics_service_pb2.ExportMetricsServiceResponse)}),
    )


def _metadata(context) -> dict[str, str]:
    return {m.key: m.value if isinstance(m.value, str) else m.value.hex()
            for m in context.invocation_metadata()}


_HTTP_ROUTES = {
    "/v1/traces": ("traces", trace_service_pb2.ExportTraceServiceRequest,
                   trace_service_pb2.ExportTraceServiceResponse),
    "/v1/metrics": ("metrics", metrics_service_pb2.ExportMetricsServiceRequest,
                    metrics_service_pb2.ExportMetricsServiceResponse),
}


def _make_http_handler(receiver: OtlpReceiver):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as OTLP/HTTP exporters expect

        def log_message(self, fmt, *args):  # silence the per-request access log
            pass

        def setup(self):
            super().setup()
            with receiver._cond:
                receiver._http_connections.add(self.connection)

        def finish(self):
            with receiver._cond:
                receiver._http_connections.discard(self.connection)
            try:
                super().finish()
            except OSError:
                pass  # the client went away (it gave up on a slow answer)

        def _reply(self, status: int, body: bytes, content_type: str) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:  # the client gave up waiting (slow answers) or stop() closed it
                self.close_connection = True

        def _reject(self, status: int, why: str) -> None:
            receiver._error(f"HTTP {self.command} {self.path}: {status} {why}")
            self._reply(status, why.encode(), "text/plain")

        def _read_body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length", "0")))

        def do_POST(self):  # noqa: N802 (http.server naming)
            body = self._read_body()
            path = self.path.split("?", 1)[0]
            route = _HTTP_ROUTES.get(path)
            if route is None:
                return self._reject(404, f"no OTLP route {path}")
            signal, request_type, response_type = route
            content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if content_type != PROTOBUF_CONTENT_TYPE:
                return self._reject(415, f"Content-Type {content_type!r}, expected "
                                         f"{PROTOBUF_CONTENT_TYPE}")
            encoding = self.headers.get("Content-Encoding", "identity").strip().lower()
            try:
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                elif encoding not in ("", "identity"):
                    return self._reject(415, f"unsupported Content-Encoding {encoding!r}")
                message = request_type.FromString(body)
            except Exception as err:  # noqa: BLE001 (any decode failure is a 400)
                return self._reject(400, f"cannot decode {encoding} protobuf body: {err}")
            response = receiver._answer(
                Received("http", signal, message, {k.lower(): v for k, v in self.headers.items()},
                         time.time_ns(), body),
                response_type)
            self._reply(200, response.SerializeToString(), PROTOBUF_CONTENT_TYPE)

        def do_GET(self):  # noqa: N802
            self._reject(405, "OTLP/HTTP accepts POST only")

    return Handler


def _print_received(received: Received) -> None:
    if received.signal == "traces":
        for span in flatten_trace_request(received.message, received.transport):
            print(format_span(span), flush=True)
            print("    resource " + json.dumps(span["resource"], sort_keys=True, default=str),
                  flush=True)
    else:
        names = [m.name for rm in received.message.resource_metrics
                 for sm in rm.scope_metrics for m in sm.metrics]
        print(f"[{received.transport}] metrics: {len(names)} metrics: {', '.join(names)}",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the spans and metrics OTLP exporters send.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--grpc-port", type=int, default=4317)
    parser.add_argument("--http-port", type=int, default=4318)
    args = parser.parse_args(argv)
    receiver = OtlpReceiver(args.host, args.grpc_port, args.http_port,
                            on_receive=_print_received).start()
    print(f"OTLP/gRPC on {receiver.grpc_endpoint}, OTLP/HTTP on {receiver.http_endpoint} "
          f"(Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        receiver.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
