//! OTLP/HTTP transport: POST of a binary protobuf body (optionally gzip) over HTTP/1.1, plain
//! or TLS (rustls with the Mozilla roots).

use std::{io::Write as _, time::Duration};

use bytes::Bytes;
use flate2::{Compression as Level, write::GzEncoder};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    HeaderMap, Method, Request, Uri,
    header::{CONTENT_ENCODING, CONTENT_TYPE, HeaderName, HeaderValue, USER_AGENT},
};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTracePartialSuccess, ExportTraceServiceResponse};
use prost::Message as _;

use super::retry::{Failure, classify_http};
use crate::export::{
    ExportError,
    config::{Compression, OtlpConfig},
};

/// Collector responses larger than this are not read (a response is a few bytes).
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// An HTTP client bound to one collector URL.
pub struct HttpTransport {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    uri: Uri,
    headers: HeaderMap,
    timeout: Duration,
    gzip: bool,
}

impl HttpTransport {
    /// Builds the client; never connects.
    pub fn new(cfg: &OtlpConfig) -> Result<HttpTransport, ExportError> {
        let invalid = |reason: String| ExportError::Endpoint {
            endpoint: cfg.endpoint.clone(),
            reason,
        };
        let uri: Uri = cfg
            .endpoint
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| invalid(e.to_string()))?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(cfg.timeout));
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| invalid(format!("TLS setup failed: {e}")))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);

        let mut headers = HeaderMap::new();
        for (name, value) in &cfg.headers {
            let bad = || ExportError::Header { name: name.clone() };
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| bad())?;
            headers.insert(name, HeaderValue::from_str(value).map_err(|_| bad())?);
        }
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/x-protobuf"));
        headers.insert(USER_AGENT, HeaderValue::from_static(super::USER_AGENT));
        let gzip = cfg.compression == Compression::Gzip;
        if gzip {
            headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        Ok(HttpTransport {
            client,
            uri,
            headers,
            timeout: cfg.timeout,
            gzip,
        })
    }

    /// The request body from an encoded message, compressed (once for all attempts) if configured.
    pub fn encode(&self, raw: Bytes) -> Result<Bytes, Failure> {
        if !self.gzip {
            return Ok(raw);
        }
        let mut gz = GzEncoder::new(Vec::with_capacity(raw.len() / 4), Level::fast());
        gz.write_all(&raw)
            .and_then(|()| gz.finish())
            .map(Bytes::from)
            .map_err(|e| Failure::permanent("encode", format!("gzip failed: {e}")))
    }

    /// One attempt; `Ok` carries the partial-success part of the response, if any.
    pub async fn send(&self, body: Bytes) -> Result<Option<ExportTracePartialSuccess>, Failure> {
        Ok(self
            .send_raw(body)
            .await?
            .and_then(|body| ExportTraceServiceResponse::decode(body).ok())
            .and_then(|r| r.partial_success))
    }

    /// One attempt; `Ok` carries the protobuf response body when there is a non-empty one.
    /// The caller decodes it; one that does not decode still means the data was accepted.
    pub(crate) async fn send_raw(&self, body: Bytes) -> Result<Option<Bytes>, Failure> {
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = self.headers.clone();
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| Failure::transient("connect", error_chain(&e)))?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| Failure::transient("response", format!("reading the response failed: {e}")))?
                .to_bytes();
            Ok((parts, body))
        };
        let (parts, body) = match tokio::time::timeout(self.timeout, exchange).await {
            Err(_) => return Err(Failure::transient("timeout", format!("no response within {:?}", self.timeout))),
            Ok(result) => result?,
        };
        if !parts.status.is_success() {
            return Err(classify_http(parts.status, &parts.headers, &body));
        }
        // Only a protobuf body can carry a partial success.
        let protobuf = parts
            .headers
            .get(CONTENT_TYPE)
            .is_none_or(|v| v.as_bytes().starts_with(b"application/x-protobuf"));
        Ok((protobuf && !body.is_empty()).then_some(body))
    }
}

/// "error trying to connect: tcp connect error: Connection refused (os error 111)".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
