//! In-process OTLP collectors for the export tests: an HTTP/protobuf one on hyper and a gRPC one
//! on tonic with the official `TraceService`, both on 127.0.0.1:0, both scriptable.

use std::{
    collections::VecDeque,
    convert::Infallible,
    io::Read as _,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use prost::Message as _;
use tokio::net::TcpListener;
use tonic::codec::CompressionEncoding;

use crate::model::{Attributes, Resource, Span, SpanKind, Status, Value};

/// What a collector answers to one request.
#[derive(Clone, Debug)]
pub enum Reply {
    /// Success, no partial-success field.
    Ok,
    /// Success with `rejected_spans` and a message.
    Partial(i64, &'static str),
    /// HTTP: this status code (with an optional Retry-After). gRPC: ignored.
    Http(u16, Option<&'static str>),
    /// gRPC: this status code. HTTP: ignored.
    Grpc(tonic::Code),
    /// Never answer (the client's timeout must fire).
    Hang,
}

/// One request as the collector saw it.
#[derive(Clone, Debug)]
pub struct Received {
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// Body size on the wire (compressed if it was).
    pub wire_bytes: usize,
    pub request: ExportTraceServiceRequest,
}

impl Received {
    /// First value of a header (lowercase name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    /// All spans in the request, in order.
    pub fn span_count(&self) -> usize {
        self.request
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum()
    }
}

#[derive(Default)]
struct Shared {
    script: Mutex<VecDeque<Reply>>,
    received: Mutex<Vec<Received>>,
}

impl Shared {
    fn next_reply(&self) -> Reply {
        self.script.lock().unwrap().pop_front().unwrap_or(Reply::Ok)
    }
    fn record(&self, r: Received) {
        self.received.lock().unwrap().push(r);
    }
}

/// A running test collector. Replies follow the script, then `Reply::Ok` forever.
pub struct Collector {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Collector {
    /// Every request received so far.
    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }
    /// Total spans received so far.
    pub fn spans(&self) -> usize {
        self.received().iter().map(Received::span_count).sum()
    }

    /// An OTLP/HTTP collector: records method, path, headers and the decoded body.
    pub async fn http(script: Vec<Reply>) -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            script: Mutex::new(script.into()),
            ..Default::default()
        });
        let state = shared.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let state = state.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle_http(state.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Collector { addr, shared }
    }

    /// An OTLP/gRPC collector built on the official `TraceService`, accepting gzip.
    pub async fn grpc(script: Vec<Reply>) -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            script: Mutex::new(script.into()),
            ..Default::default()
        });
        let service = TraceServiceServer::new(GrpcCollector(shared.clone())).accept_compressed(CompressionEncoding::Gzip);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        Collector { addr, shared }
    }
}

async fn handle_http(state: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let wire = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("<binary>").to_owned()))
        .collect();
    let gzip = parts.headers.get("content-encoding").is_some_and(|v| v == "gzip");
    let raw = if gzip {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&wire[..])
            .read_to_end(&mut out)
            .expect("body is valid gzip");
        out
    } else {
        wire.to_vec()
    };
    let request = ExportTraceServiceRequest::decode(&raw[..]).expect("body is an ExportTraceServiceRequest");
    state.record(Received {
        path: parts.uri.path().to_owned(),
        headers,
        wire_bytes: wire.len(),
        request,
    });
    let reply = state.next_reply();
    let (status, retry_after, body) = match reply {
        Reply::Ok | Reply::Grpc(_) => (200, None, ExportTraceServiceResponse::default().encode_to_vec()),
        Reply::Partial(rejected, msg) => (200, None, partial(rejected, msg).encode_to_vec()),
        Reply::Http(code, retry_after) => (
            code,
            retry_after,
            tonic_types::Status {
                code: 3,
                message: format!("status {code}"),
                details: vec![],
            }
            .encode_to_vec(),
        ),
        Reply::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            (200, None, Vec::new())
        }
    };
    let mut response = Response::builder().status(status).header("content-type", "application/x-protobuf");
    if let Some(ra) = retry_after {
        response = response.header("retry-after", ra);
    }
    Ok(response.body(Full::new(Bytes::from(body))).unwrap())
}

fn partial(rejected: i64, msg: &str) -> ExportTraceServiceResponse {
    ExportTraceServiceResponse {
        partial_success: Some(ExportTracePartialSuccess {
            rejected_spans: rejected,
            error_message: msg.to_owned(),
        }),
    }
}

struct GrpcCollector(Arc<Shared>);

#[tonic::async_trait]
impl TraceService for GrpcCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let headers = request
            .metadata()
            .clone()
            .into_headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("<binary>").to_owned()))
            .collect();
        let request = request.into_inner();
        self.0.record(Received {
            path: String::new(),
            headers,
            wire_bytes: 0,
            request,
        });
        match self.0.next_reply() {
            Reply::Ok | Reply::Http(..) => Ok(tonic::Response::new(ExportTraceServiceResponse::default())),
            Reply::Partial(rejected, msg) => Ok(tonic::Response::new(partial(rejected, msg))),
            Reply::Grpc(code) => Err(tonic::Status::new(code, "scripted failure")),
            Reply::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
            }
        }
    }
}

/// A resource with `service.name` and one more attribute.
pub fn resource(name: &str) -> Arc<Resource> {
    let mut attributes = Attributes::default();
    attributes.push("service.name", name);
    attributes.push("service.instance.id", format!("{name}-1"));
    Arc::new(Resource {
        service_name: name.to_owned(),
        attributes,
    })
}

/// A distinct span per `n`: ids derived from `n`, parented when `n` is odd.
pub fn span(resource: &Arc<Resource>, n: u32) -> Span {
    let mut attributes = Attributes::default();
    attributes.push("http.request.method", "GET");
    attributes.push("url.path", format!("/items/{n}"));
    attributes.push("http.response.status_code", 200i64);
    attributes
        .0
        .push(("tapwire.test.ratio".into(), Value::Double(f64::from(n) / 4.0)));
    attributes.push("tapwire.test.odd", n % 2 == 1);
    let mut trace_id = [0u8; 16];
    trace_id[..4].copy_from_slice(&n.to_be_bytes());
    trace_id[15] = 0xee;
    let mut span_id = [0u8; 8];
    span_id[4..].copy_from_slice(&n.to_be_bytes());
    span_id[0] = 0x5a;
    Span {
        resource: resource.clone(),
        trace_id,
        span_id,
        parent_span_id: (n % 2 == 1).then_some([0x77; 8]),
        trace_state: if n % 2 == 1 { "k=v".to_owned() } else { String::new() },
        flags: 1,
        name: format!("GET /items/{n}"),
        kind: if n % 2 == 1 { SpanKind::Server } else { SpanKind::Client },
        start_unix_nano: 1_700_000_000_000_000_000 + u64::from(n) * 1000,
        end_unix_nano: 1_700_000_000_012_000_000 + u64::from(n) * 1000,
        attributes,
        status: if n.is_multiple_of(3) {
            Status::Error {
                message: format!("failure {n}"),
            }
        } else {
            Status::Unset
        },
    }
}
