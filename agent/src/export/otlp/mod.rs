//! OTLP trace export: encode a batch once, send it over gRPC or HTTP/protobuf, retry what the
//! spec calls retryable, and report what the collector accepted.

pub mod encode;
pub(crate) mod grpc;
pub(crate) mod http;
pub mod retry;
pub mod wire;

#[cfg(test)]
mod tests;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTracePartialSuccess;
use tokio::time::Instant;

use self::{
    grpc::GrpcTransport,
    http::HttpTransport,
    retry::{Failure, RetryPolicy},
};
use super::{
    Delivery, ExportError,
    config::{OtlpConfig, Protocol},
};
use crate::model::Span;

/// `User-Agent` on every request, as the OTLP spec recommends.
pub const USER_AGENT: &str = concat!("tapwire/", env!("CARGO_PKG_VERSION"));

#[expect(clippy::large_enum_variant, reason = "one instance per agent, never moved after start")]
enum Transport {
    Grpc(GrpcTransport),
    Http(HttpTransport),
}

/// Sends batches to one collector.
pub struct OtlpExporter {
    transport: Transport,
    policy: RetryPolicy,
    /// The collector's URL, credentials masked, for the warnings.
    endpoint: String,
}

impl OtlpExporter {
    /// Builds the client for the configured protocol; does not connect.
    pub fn new(cfg: &OtlpConfig) -> Result<OtlpExporter, ExportError> {
        let transport = match cfg.protocol {
            Protocol::Grpc => Transport::Grpc(GrpcTransport::new(cfg)?),
            Protocol::HttpProtobuf => Transport::Http(HttpTransport::new(cfg)?),
        };
        Ok(OtlpExporter {
            transport,
            policy: RetryPolicy::default(),
            endpoint: super::config::redact_userinfo(&cfg.endpoint),
        })
    }

    /// The collector's URL (credentials masked).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Replaces the retry schedule (tests use short delays).
    pub fn with_policy(mut self, policy: RetryPolicy) -> OtlpExporter {
        self.policy = policy;
        self
    }

    /// Exports one batch, retrying until `deadline`. Returns the outcome and the attempts made.
    pub async fn export(&mut self, spans: &[Span], deadline: Instant) -> (Result<Delivery, Failure>, u32) {
        let mut request = Vec::with_capacity(spans.len() * 768);
        wire::encode_request(spans, &mut request);
        let request = bytes::Bytes::from(request);
        let policy = &self.policy;
        let (result, attempts) = match &self.transport {
            Transport::Grpc(grpc) => policy.run(deadline, || grpc.send(request.clone())).await,
            Transport::Http(http) => match http.encode(request) {
                Ok(body) => policy.run(deadline, || http.send(body.clone())).await,
                Err(failure) => (Err(failure), 0),
            },
        };
        (result.map(|partial| delivery(spans.len(), partial)), attempts)
    }
}

/// Applies a partial-success answer: `rejected_spans` are failed, the rest accepted.
fn delivery(sent: usize, partial: Option<ExportTracePartialSuccess>) -> Delivery {
    let Some(partial) = partial else {
        return Delivery {
            accepted: sent,
            rejected: 0,
            message: None,
        };
    };
    let rejected = usize::try_from(partial.rejected_spans.max(0)).unwrap_or(usize::MAX).min(sent);
    // A message with zero rejected spans is a warning from the collector: still worth a log.
    let message = (rejected > 0 || !partial.error_message.is_empty()).then_some(partial.error_message);
    Delivery {
        accepted: sent - rejected,
        rejected,
        message,
    }
}
