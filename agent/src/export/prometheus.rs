//! The Prometheus pull endpoint: `GET /metrics` renders the latest snapshot the app stored in
//! [`PrometheusState`] ([`text`] has the OpenTelemetry -> Prometheus mapping); `GET /healthz`
//! answers `ok` for Kubernetes probes. HTTP/1.1 on hyper, gzip when the scraper accepts it.

pub mod text;

use std::{
    convert::Infallible,
    io::Write as _,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use flate2::{Compression as Level, write::GzEncoder};
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::Incoming,
    header::{ACCEPT_ENCODING, ALLOW, CONTENT_ENCODING, CONTENT_TYPE, HeaderValue},
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};

pub use self::text::render;
use super::ratelimit::LogLimiter;
use crate::metrics::model::Snapshot;

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 32;
/// A client must send its request head within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum PrometheusError {
    #[error("cannot listen on {addr} for Prometheus scrapes")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The latest snapshot, shared between the app (writer) and the scrapes (readers).
#[derive(Debug, Default)]
pub struct PrometheusState {
    latest: Mutex<Arc<Snapshot>>,
}

impl PrometheusState {
    /// An empty state: `/metrics` answers 200 with no samples until the first update.
    pub fn new() -> PrometheusState {
        PrometheusState::default()
    }

    /// Replaces the snapshot that scrapes render.
    pub fn update(&self, snapshot: Snapshot) {
        // A poisoned lock only means a panic elsewhere mid-swap; the value is still whole.
        *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(snapshot);
    }

    /// The exposition text of the latest snapshot.
    pub fn render(&self) -> String {
        let snapshot = self.latest.lock().unwrap_or_else(|e| e.into_inner()).clone();
        render(&snapshot)
    }
}

/// A bound listener, ready to serve.
#[derive(Debug)]
pub struct PrometheusServer {
    listener: TcpListener,
    addr: SocketAddr,
}

impl PrometheusServer {
    /// Binds `addr` (port 0 picks a free port; see [`local_addr`](Self::local_addr)).
    pub async fn bind(addr: SocketAddr) -> Result<PrometheusServer, PrometheusError> {
        let bind = |source| PrometheusError::Bind { addr, source };
        let listener = TcpListener::bind(addr).await.map_err(bind)?;
        let addr = listener.local_addr().map_err(bind)?;
        Ok(PrometheusServer { listener, addr })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves scrapes until the task is dropped or aborted. Never returns on its own: accept
    /// errors (e.g. out of file descriptors) are logged, rate-limited, and retried.
    pub async fn run(self, state: Arc<PrometheusState>) {
        tracing::info!(addr = %self.addr, "serving Prometheus metrics on /metrics");
        let limiter = LogLimiter::new(Duration::from_secs(10));
        let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else { return };
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    if let Some(held_back) = limiter.check("accept") {
                        tracing::warn!(error = %e, held_back, "Prometheus endpoint: accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let state = state.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(respond(&state, &req)) }
                });
                // Errors here are the client's (reset, timeout): nothing to do about them.
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                drop(permit);
            });
        }
    }
}

/// Binds `addr` and serves scrapes of `state` forever (see [`PrometheusServer`] to learn the
/// bound address first).
pub async fn serve(addr: SocketAddr, state: Arc<PrometheusState>) -> Result<(), PrometheusError> {
    PrometheusServer::bind(addr).await?.run(state).await;
    Ok(())
}

/// Routes one request.
fn respond(state: &PrometheusState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let get = matches!(*req.method(), Method::GET | Method::HEAD);
    match req.uri().path() {
        "/metrics" | "/healthz" if !get => {
            let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            r.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            r
        }
        "/metrics" => {
            let body = state.render();
            let gzip = req
                .headers()
                .get_all(ACCEPT_ENCODING)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.split(',').any(|e| e.split(';').next().is_some_and(|e| e.trim() == "gzip")));
            let mut response = Response::new(Full::new(Bytes::new()));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(text::CONTENT_TYPE));
            let compressed = gzip.then(|| compress(body.as_bytes())).flatten();
            match compressed {
                Some(gz) => {
                    response
                        .headers_mut()
                        .insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                    *response.body_mut() = Full::new(Bytes::from(gz));
                }
                None => *response.body_mut() = Full::new(Bytes::from(body)),
            }
            response
        }
        "/healthz" => plain(StatusCode::OK, "ok"),
        _ => plain(StatusCode::NOT_FOUND, "not found: try /metrics or /healthz\n"),
    }
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

fn compress(raw: &[u8]) -> Option<Vec<u8>> {
    let mut gz = GzEncoder::new(Vec::with_capacity(raw.len() / 4), Level::fast());
    gz.write_all(raw).ok()?;
    gz.finish().ok()
}

#[cfg(test)]
mod tests;
