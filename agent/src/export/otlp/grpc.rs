//! OTLP/gRPC transport: `TraceService/Export` over a lazily connected tonic channel.

use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, trace_service_client::TraceServiceClient,
};
use tonic::{
    codec::CompressionEncoding,
    metadata::{MetadataKey, MetadataMap, MetadataValue},
    transport::{Channel, ClientTlsConfig, Endpoint},
};

use super::retry::{Failure, classify_grpc};
use crate::export::{
    ExportError,
    config::{Compression, OtlpConfig},
};

/// A gRPC client bound to one collector. Connects on first use and reconnects by itself.
pub struct GrpcTransport {
    client: TraceServiceClient<Channel>,
    metadata: MetadataMap,
    timeout: Duration,
}

impl GrpcTransport {
    /// Builds the client; never blocks (the connection is made lazily).
    pub fn new(cfg: &OtlpConfig) -> Result<GrpcTransport, ExportError> {
        let invalid = |reason: String| ExportError::Endpoint {
            endpoint: cfg.endpoint.clone(),
            reason,
        };
        let mut endpoint = Endpoint::from_shared(cfg.endpoint.clone())
            .map_err(|e| invalid(e.to_string()))?
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout)
            .user_agent(super::USER_AGENT)
            .map_err(|e| invalid(e.to_string()))?;
        if cfg.endpoint.starts_with("https://") {
            endpoint = endpoint
                .tls_config(ClientTlsConfig::new().with_webpki_roots())
                .map_err(|e| invalid(format!("TLS setup failed: {e}")))?;
        }
        let mut client = TraceServiceClient::new(endpoint.connect_lazy());
        if cfg.compression == Compression::Gzip {
            client = client
                .send_compressed(CompressionEncoding::Gzip)
                .accept_compressed(CompressionEncoding::Gzip);
        }
        let mut metadata = MetadataMap::new();
        for (name, value) in &cfg.headers {
            let bad = || ExportError::Header { name: name.clone() };
            let key = MetadataKey::from_bytes(name.as_bytes()).map_err(|_| bad())?;
            let value = MetadataValue::try_from(value.as_str()).map_err(|_| bad())?;
            metadata.insert(key, value);
        }
        Ok(GrpcTransport {
            client,
            metadata,
            timeout: cfg.timeout,
        })
    }

    /// One attempt; `Ok` carries the partial-success part of the response, if any.
    pub async fn send(&self, request: ExportTraceServiceRequest) -> Result<Option<ExportTracePartialSuccess>, Failure> {
        let mut request = tonic::Request::new(request);
        *request.metadata_mut() = self.metadata.clone();
        request.set_timeout(self.timeout);
        // The channel's own timeout covers the call; this one also bounds connection setup.
        let mut client = self.client.clone(); // cheap: a handle on the shared channel
        match tokio::time::timeout(self.timeout + Duration::from_millis(100), client.export(request)).await {
            Err(_) => Err(Failure::transient("timeout", format!("no response within {:?}", self.timeout))),
            Ok(Err(status)) => Err(classify_grpc(&status)),
            Ok(Ok(response)) => Ok(response.into_inner().partial_success),
        }
    }
}
