//! OTLP/gRPC transport: `TraceService/Export` over a lazily connected tonic channel. The channel,
//! metadata and call helpers are shared with `MetricsService/Export` (export::metrics::otlp).

use std::time::Duration;

use bytes::{Buf as _, BufMut as _, Bytes};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTracePartialSuccess, ExportTraceServiceResponse};
use tonic::{
    Status,
    client::Grpc,
    codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder},
    metadata::{MetadataKey, MetadataMap, MetadataValue},
    transport::{Channel, ClientTlsConfig, Endpoint},
};

use super::retry::{Failure, classify_grpc};
use crate::export::{
    ExportError,
    config::{Compression, OtlpConfig},
};

/// The method every trace export calls.
const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// A gRPC client bound to one collector. Connects on first use and reconnects by itself.
pub struct GrpcTransport {
    client: Grpc<Channel>,
    metadata: MetadataMap,
    timeout: Duration,
}

impl GrpcTransport {
    /// Builds the client; never blocks (the connection is made lazily).
    pub fn new(cfg: &OtlpConfig) -> Result<GrpcTransport, ExportError> {
        let mut client = Grpc::new(channel(cfg)?);
        if cfg.compression == Compression::Gzip {
            client = client
                .send_compressed(CompressionEncoding::Gzip)
                .accept_compressed(CompressionEncoding::Gzip);
        }
        Ok(GrpcTransport {
            client,
            metadata: metadata(cfg)?,
            timeout: cfg.timeout,
        })
    }

    /// One attempt with an encoded `ExportTraceServiceRequest` (see `wire`); `Ok` carries the
    /// partial-success part of the response, if any.
    pub async fn send(&self, request: Bytes) -> Result<Option<ExportTracePartialSuccess>, Failure> {
        let mut request = request_with(request, &self.metadata, self.timeout);
        request
            .extensions_mut()
            .insert(tonic::GrpcMethod::new("opentelemetry.proto.collector.trace.v1.TraceService", "Export"));
        let mut client = self.client.clone(); // cheap: a handle on the shared channel
        let export = async move {
            client
                .ready()
                .await
                .map_err(|e| Status::unavailable(format!("the channel is not ready: {e}")))?;
            client.unary(request, http::uri::PathAndQuery::from_static(EXPORT_PATH), EncodedCodec).await
        };
        call(self.timeout, export)
            .await
            .map(|response: ExportTraceServiceResponse| response.partial_success)
    }
}

/// Sends a message encoded beforehand (the same bytes for every attempt) and decodes the
/// `ExportTraceServiceResponse`.
#[derive(Clone, Copy, Debug, Default)]
struct EncodedCodec;

impl Codec for EncodedCodec {
    type Encode = Bytes;
    type Decode = ExportTraceServiceResponse;
    type Encoder = EncodedCodec;
    type Decoder = EncodedCodec;

    fn encoder(&mut self) -> Self::Encoder {
        EncodedCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        EncodedCodec
    }
}

impl Encoder for EncodedCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for EncodedCodec {
    type Item = ExportTraceServiceResponse;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<ExportTraceServiceResponse>, Status> {
        let len = src.remaining();
        prost::Message::decode(src.take(len))
            .map(Some)
            .map_err(|e| Status::internal(format!("cannot decode the collector's response: {e}")))
    }
}

/// A lazily connected channel to the collector (TLS with the Mozilla roots for `https://`).
pub(crate) fn channel(cfg: &OtlpConfig) -> Result<Channel, ExportError> {
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
    Ok(endpoint.connect_lazy())
}

/// The configured headers as gRPC metadata.
pub(crate) fn metadata(cfg: &OtlpConfig) -> Result<MetadataMap, ExportError> {
    let mut metadata = MetadataMap::new();
    for (name, value) in &cfg.headers {
        let bad = || ExportError::Header { name: name.clone() };
        let key = MetadataKey::from_bytes(name.as_bytes()).map_err(|_| bad())?;
        let value = MetadataValue::try_from(value.as_str()).map_err(|_| bad())?;
        metadata.insert(key, value);
    }
    Ok(metadata)
}

/// A request carrying the configured metadata and the per-request timeout.
pub(crate) fn request_with<T>(message: T, metadata: &MetadataMap, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    *request.metadata_mut() = metadata.clone();
    request.set_timeout(timeout);
    request
}

/// Awaits one call, bounded by `timeout`, with failures classified for the retry policy.
pub(crate) async fn call<T>(
    timeout: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, Failure> {
    // The channel's own timeout covers the call; this one also bounds connection setup.
    let timed_out = || Failure::transient("timeout", format!("no response within {timeout:?}"));
    match tokio::time::timeout(timeout + Duration::from_millis(100), call).await {
        Err(_) => Err(timed_out()),
        Ok(Err(status)) if is_own_timeout(&status) => Err(timed_out()),
        Ok(Err(status)) => Err(classify_grpc(&status)),
        Ok(Ok(response)) => Ok(response.into_inner()),
    }
}

/// The channel's timeout fired: tonic reports it as CANCELLED "Timeout expired", which would
/// read as if something else had cancelled the call.
fn is_own_timeout(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Cancelled && status.message() == tonic::TimeoutExpired(()).to_string()
}
