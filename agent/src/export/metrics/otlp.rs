//! OTLP metrics over the span exporter's transports: `MetricsService/Export` on the shared gRPC
//! channel setup, or a POST to `/v1/metrics` with the same HTTP client, and the same retry policy.

use std::time::Duration;

use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
    metrics_service_client::MetricsServiceClient,
};
use prost::Message as _;
use tokio::time::Instant;
use tonic::{codec::CompressionEncoding, metadata::MetadataMap, transport::Channel};

use super::encode::{MAX_POINTS_PER_REQUEST, encode_requests};
use crate::{
    export::{
        Delivery, ExportError,
        config::{Compression, OtlpConfig, Protocol},
        otlp::{
            grpc::{call, channel, metadata, request_with},
            http::HttpTransport,
            retry::{Failure, RetryPolicy},
        },
    },
    metrics::model::Snapshot,
};

#[expect(clippy::large_enum_variant, reason = "one instance per agent, never moved after start")]
enum Transport {
    Grpc {
        client: MetricsServiceClient<Channel>,
        metadata: MetadataMap,
        timeout: Duration,
    },
    Http(HttpTransport),
}

/// Sends metric snapshots to one collector.
pub struct OtlpMetricsExporter {
    transport: Transport,
    policy: RetryPolicy,
    /// The collector's URL, credentials masked, for the warnings.
    endpoint: String,
}

impl OtlpMetricsExporter {
    /// Builds the client for the configured protocol; does not connect.
    pub fn new(cfg: &OtlpConfig) -> Result<OtlpMetricsExporter, ExportError> {
        let transport = match cfg.protocol {
            Protocol::Grpc => {
                let mut client = MetricsServiceClient::new(channel(cfg)?);
                if cfg.compression == Compression::Gzip {
                    client = client
                        .send_compressed(CompressionEncoding::Gzip)
                        .accept_compressed(CompressionEncoding::Gzip);
                }
                Transport::Grpc {
                    client,
                    metadata: metadata(cfg)?,
                    timeout: cfg.timeout,
                }
            }
            Protocol::HttpProtobuf => Transport::Http(HttpTransport::new(cfg)?),
        };
        Ok(OtlpMetricsExporter {
            transport,
            policy: RetryPolicy::default(),
            endpoint: crate::export::config::redact_userinfo(&cfg.endpoint),
        })
    }

    /// The collector's URL (credentials masked).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Replaces the retry schedule (tests use short delays).
    pub fn with_policy(mut self, policy: RetryPolicy) -> OtlpMetricsExporter {
        self.policy = policy;
        self
    }

    /// Exports one snapshot (in as many requests as [`MAX_POINTS_PER_REQUEST`] needs), each
    /// retried until `deadline`. `Delivery` counts data points. Returns the first failure, with
    /// the points of every request that failed counted as rejected in it; and the attempts made.
    pub async fn export(&mut self, snapshot: &Snapshot, deadline: Instant) -> (Result<Delivery, Failure>, u32) {
        let mut total = Delivery {
            accepted: 0,
            rejected: 0,
            message: None,
        };
        let mut first_failure: Option<Failure> = None;
        let mut attempts = 0;
        for (request, points) in encode_requests(snapshot, MAX_POINTS_PER_REQUEST) {
            let (result, made) = self.send(request, deadline).await;
            attempts += made;
            match result {
                Ok(partial) => {
                    let d = delivery(points, partial);
                    total.accepted += d.accepted;
                    total.rejected += d.rejected;
                    total.message = total.message.or(d.message);
                }
                Err(failure) => {
                    total.rejected += points;
                    first_failure.get_or_insert(failure);
                }
            }
        }
        match first_failure {
            // Some requests went through: the caller counts them from the delivery.
            Some(failure) if total.accepted == 0 => (Err(failure), attempts),
            Some(failure) => {
                total.message = Some(failure.message);
                (Ok(total), attempts)
            }
            None => (Ok(total), attempts),
        }
    }

    async fn send(
        &self,
        request: ExportMetricsServiceRequest,
        deadline: Instant,
    ) -> (Result<Option<ExportMetricsPartialSuccess>, Failure>, u32) {
        let policy = &self.policy;
        match &self.transport {
            Transport::Grpc {
                client,
                metadata,
                timeout,
            } => {
                policy
                    .run(deadline, || {
                        let mut client = client.clone(); // cheap: a handle on the shared channel
                        let request = request_with(request.clone(), metadata, *timeout);
                        async move { call(*timeout, client.export(request)).await.map(|r| r.partial_success) }
                    })
                    .await
            }
            Transport::Http(http) => match http.encode(request.encode_to_vec().into()) {
                Ok(body) => {
                    policy
                        .run(deadline, || async {
                            let response = http.send_raw(body.clone()).await?;
                            Ok(response
                                .and_then(|b| ExportMetricsServiceResponse::decode(b).ok())
                                .and_then(|r| r.partial_success))
                        })
                        .await
                }
                Err(failure) => (Err(failure), 0),
            },
        }
    }
}

/// Applies a partial-success answer: `rejected_data_points` failed, the rest accepted.
fn delivery(sent: usize, partial: Option<ExportMetricsPartialSuccess>) -> Delivery {
    let Some(partial) = partial else {
        return Delivery {
            accepted: sent,
            rejected: 0,
            message: None,
        };
    };
    let rejected = usize::try_from(partial.rejected_data_points.max(0))
        .unwrap_or(usize::MAX)
        .min(sent);
    let message = (rejected > 0 || !partial.error_message.is_empty()).then_some(partial.error_message);
    Delivery {
        accepted: sent - rejected,
        rejected,
        message,
    }
}
