"""The bench's OTLP endpoint: tests/e2e's independent receiver (official opentelemetry-proto +
grpcio), counting spans per service instead of keeping every request, so a long run at 20k
spans/s does not grow the harness's memory. It runs in the harness process, on CPU_CLIENT.
"""

from __future__ import annotations

from collections import Counter

import harness  # noqa: F401  (puts tests/e2e on sys.path)
from otlp_receiver import OtlpReceiver, Received


def _service_name(resource) -> str:
    for kv in resource.attributes:
        if kv.key == "service.name":
            return kv.value.string_value
    return ""


class CountingReceiver(OtlpReceiver):
    """OtlpReceiver that counts what arrives (spans per service.name, requests per signal)."""

    def __init__(self):
        super().__init__("127.0.0.1", 0, 0)
        self._spans: Counter[str] = Counter()
        self._requests: Counter[str] = Counter()

    def _store(self, received: Received) -> None:  # replaces storing with counting
        with self._cond:
            self._requests[received.signal] += 1
            if received.signal == "traces":
                for rs in received.message.resource_spans:
                    name = _service_name(rs.resource)
                    self._spans[name] += sum(len(ss.spans) for ss in rs.scope_spans)
            self._cond.notify_all()

    def span_counts(self) -> dict[str, int]:
        with self._cond:
            return dict(self._spans)

    def request_counts(self) -> dict[str, int]:
        with self._cond:
            return dict(self._requests)

    def grpc_env(self) -> dict[str, str]:
        """OTEL_* variables pointing an OTLP exporter at this receiver over gRPC."""
        return {"OTEL_EXPORTER_OTLP_ENDPOINT": self.grpc_endpoint,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}


def spans_since(before: dict[str, int], after: dict[str, int],
                exclude: tuple[str, ...] = ()) -> int:
    """Spans that arrived between two span_counts() snapshots, leaving out some services."""
    return sum(n - before.get(name, 0) for name, n in after.items() if name not in exclude)
