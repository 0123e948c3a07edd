//! In-process OTLP metrics collectors (HTTP/protobuf on hyper, gRPC on tonic's official
//! `MetricsService`), scripted with the span tests' [`Reply`], and a sample snapshot.

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
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
    metrics_service_server::{MetricsService, MetricsServiceServer},
};
use prost::Message as _;
use tokio::net::TcpListener;
use tonic::codec::CompressionEncoding;

pub use crate::export::test_support::Reply;
use crate::{
    metrics::model::{Data, HistogramPoint, Metric, Number, NumberPoint, ResourceMetrics, Snapshot},
    model::{Attributes, Resource, Value},
};

/// One request as the collector saw it.
#[derive(Clone, Debug)]
pub struct Received {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub request: ExportMetricsServiceRequest,
}

impl Received {
    /// First value of a header (lowercase name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
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
}

/// A running metrics collector. Replies follow the script, then `Reply::Ok` forever.
pub struct MetricsCollector {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl MetricsCollector {
    /// Every request received so far.
    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }

    /// OTLP/HTTP: records path, headers and the decoded (gunzipped) body.
    pub async fn http(script: Vec<Reply>) -> MetricsCollector {
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
        MetricsCollector { addr, shared }
    }

    /// OTLP/gRPC on the official `MetricsService`, accepting gzip.
    pub async fn grpc(script: Vec<Reply>) -> MetricsCollector {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            script: Mutex::new(script.into()),
            ..Default::default()
        });
        let service = MetricsServiceServer::new(GrpcCollector(shared.clone())).accept_compressed(CompressionEncoding::Gzip);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        MetricsCollector { addr, shared }
    }
}

fn partial(rejected: i64, msg: &str) -> ExportMetricsServiceResponse {
    ExportMetricsServiceResponse {
        partial_success: Some(ExportMetricsPartialSuccess {
            rejected_data_points: rejected,
            error_message: msg.to_owned(),
        }),
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
    let raw = if parts.headers.get("content-encoding").is_some_and(|v| v == "gzip") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&wire[..])
            .read_to_end(&mut out)
            .expect("body is valid gzip");
        out
    } else {
        wire.to_vec()
    };
    let request = ExportMetricsServiceRequest::decode(&raw[..]).expect("body is an ExportMetricsServiceRequest");
    state.received.lock().unwrap().push(Received {
        path: parts.uri.path().to_owned(),
        headers,
        request,
    });
    let (status, body) = match state.next_reply() {
        Reply::Ok | Reply::Grpc(_) => (200, ExportMetricsServiceResponse::default().encode_to_vec()),
        Reply::Partial(rejected, msg) => (200, partial(rejected, msg).encode_to_vec()),
        Reply::Http(code, _) => (code, Vec::new()),
        Reply::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            (200, Vec::new())
        }
    };
    let response = Response::builder()
        .status(status)
        .header("content-type", "application/x-protobuf")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    Ok(response)
}

struct GrpcCollector(Arc<Shared>);

#[tonic::async_trait]
impl MetricsService for GrpcCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let headers = request
            .metadata()
            .clone()
            .into_headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("<binary>").to_owned()))
            .collect();
        self.0.received.lock().unwrap().push(Received {
            path: String::new(),
            headers,
            request: request.into_inner(),
        });
        match self.0.next_reply() {
            Reply::Ok | Reply::Http(..) => Ok(tonic::Response::new(ExportMetricsServiceResponse::default())),
            Reply::Partial(rejected, msg) => Ok(tonic::Response::new(partial(rejected, msg))),
            Reply::Grpc(code) => Err(tonic::Status::new(code, "scripted failure")),
            Reply::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
            }
        }
    }
}

/// A resource with the attributes discover sets.
pub fn resource(name: &str, extra: &[(&str, Value)]) -> Arc<Resource> {
    let mut attributes = Attributes::default();
    attributes.push("service.name", name);
    attributes.push("service.instance.id", format!("node-1:{}", name.len()));
    for (k, v) in extra {
        attributes.0.push(((*k).to_owned().into(), v.clone()));
    }
    Arc::new(Resource {
        service_name: name.to_owned(),
        attributes,
    })
}

fn attrs(pairs: &[(&str, Value)]) -> Attributes {
    Attributes(pairs.iter().map(|(k, v)| ((*k).to_owned().into(), v.clone())).collect())
}

/// Two resources (the first reported twice, as two producers would), one metric of each kind:
/// 6 data points in all.
pub fn sample_snapshot() -> Snapshot {
    let shop = resource("shop", &[("process.pid", Value::Int(42))]);
    let shop_again = Arc::new((*shop).clone());
    let agent = resource("tapwire", &[]);
    let duration = Metric {
        name: "http.server.request.duration".into(),
        description: "Duration of HTTP server requests.".into(),
        unit: "s".into(),
        data: Data::Histogram {
            points: vec![HistogramPoint {
                attributes: attrs(&[
                    ("http.request.method", Value::Str("GET".into())),
                    ("http.response.status_code", Value::Int(200)),
                ]),
                start_unix_nano: 1_000,
                time_unix_nano: 9_000,
                count: 3,
                sum: 0.125,
                bounds: vec![0.005, 0.1, 1.0],
                bucket_counts: vec![1, 1, 1, 0],
                min: Some(0.005),
                max: Some(0.11),
            }],
        },
    };
    let active = Metric {
        name: "http.server.active_requests".into(),
        description: "Number of active HTTP server requests.".into(),
        unit: "{request}".into(),
        data: Data::Sum {
            monotonic: false,
            points: vec![
                number(&[("http.request.method", Value::Str("GET".into()))], 1_000, Number::Int(2)),
                number(&[("http.request.method", Value::Str("POST".into()))], 1_000, Number::Int(0)),
            ],
        },
    };
    let cpu = Metric {
        name: "process.cpu.utilization".into(),
        description: "CPU use.".into(),
        unit: "1".into(),
        data: Data::Gauge {
            points: vec![number(&[], 0, Number::Double(0.25))],
        },
    };
    let events = Metric {
        name: "tapwire.agent.events.read".into(),
        description: "Ring-buffer events decoded by the agent.".into(),
        unit: "{event}".into(),
        data: Data::Sum {
            monotonic: true,
            points: vec![number(&[], 500, Number::Int(1234))],
        },
    };
    let spans = Metric {
        name: "tapwire.agent.spans".into(),
        description: "Spans by state.".into(),
        unit: "{span}".into(),
        data: Data::Sum {
            monotonic: true,
            points: vec![number(&[("state", Value::Str("created".into()))], 500, Number::Int(7))],
        },
    };
    vec![
        ResourceMetrics {
            resource: shop,
            metrics: vec![duration, active],
        },
        ResourceMetrics {
            resource: agent,
            metrics: vec![events, spans],
        },
        ResourceMetrics {
            resource: shop_again,
            metrics: vec![cpu],
        },
    ]
}

fn number(pairs: &[(&str, Value)], start: u64, value: Number) -> NumberPoint {
    NumberPoint {
        attributes: attrs(pairs),
        start_unix_nano: start,
        time_unix_nano: 9_000,
        value,
    }
}
