//! Spans from finished exchanges, with OpenTelemetry HTTP semantic-convention attributes.
//!
//! Never exported: query strings (only `url.query = "REDACTED"` says one was there), header
//! values other than Host and User-Agent, bodies.

use std::{net::SocketAddr, sync::Arc};

use super::{Side, exchange::Exchange, trace::SpanIds};
use crate::{
    capture::event::Endpoints,
    clock::Clock,
    model::{Attributes, Resource, Span, SpanKind, Status, Value},
    protocols::http1::KNOWN_METHODS,
};

/// Replaces the query string wherever one would be exported.
pub const REDACTED: &str = "REDACTED";

/// How an exchange ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// A response was seen (its end may be approximate).
    Answered,
    /// The connection closed with the request unanswered.
    Closed,
    /// The connection went idle with the request unanswered.
    Timeout,
}

impl Outcome {
    fn error_type(self) -> Option<&'static str> {
        match self {
            Outcome::Answered => None,
            Outcome::Closed => Some("connection_closed"),
            Outcome::Timeout => Some("timeout"),
        }
    }
}

/// What the connection contributes to its spans.
pub(crate) struct ConnView<'a> {
    pub side: Side,
    pub resource: &'a Arc<Resource>,
    pub endpoints: Option<Endpoints>,
}

/// Builds the span of one exchange that ended at `end_ts` (monotonic ns).
pub(crate) fn build(conn: &ConnView<'_>, ex: &Exchange, end_ts: u64, outcome: Outcome, ids: SpanIds, clock: &Clock) -> Span {
    let req = &ex.request;
    let mut a = Attributes::default();
    let method = normalise_method(&req.method);
    a.push("http.request.method", Value::fixed(method));
    if method == "_OTHER" {
        a.push("http.request.method_original", req.method.as_str());
    }
    let (path, has_query) = split_target(&req.target);
    let status_code = ex.response.as_ref().map(|r| r.status);
    match conn.side {
        Side::Server => {
            if let Some(path) = path {
                a.push("url.path", path);
            }
            a.push("url.scheme", Value::fixed("http"));
            if has_query {
                a.push("url.query", Value::fixed(REDACTED));
            }
            if let Some(code) = status_code {
                a.push("http.response.status_code", i64::from(code));
            }
            if let Some((host, _)) = req.headers.host.as_deref().and_then(split_host) {
                a.push("server.address", host);
            }
            if let Some(ep) = conn.endpoints {
                a.push("server.port", i64::from(ep.local.port()));
                a.push("client.address", ep.peer.ip().to_string());
            }
        }
        Side::Client => {
            let host = req.headers.host.as_deref().and_then(split_host);
            let peer = conn.endpoints.map(|e| e.peer);
            let address = host.map(|(h, _)| h.to_owned()).or_else(|| peer.map(|p| p.ip().to_string()));
            let port = host.and_then(|(_, p)| p).or_else(|| peer.map(|p| p.port()));
            if let Some(address) = &address {
                a.push("server.address", address.as_str());
            }
            if let Some(port) = port {
                a.push("server.port", i64::from(port));
            }
            if let Some(path) = path {
                let authority = req.headers.host.clone().filter(|h| !h.is_empty()).or_else(|| peer.map(authority_of));
                if let Some(authority) = authority {
                    let query = if has_query { format!("?{REDACTED}") } else { String::new() };
                    a.push("url.full", format!("http://{authority}{path}{query}"));
                }
            }
            if let Some(code) = status_code {
                a.push("http.response.status_code", i64::from(code));
            }
        }
    }
    if let Some(ep) = conn.endpoints {
        a.push("network.peer.address", ep.peer.ip().to_string());
        a.push("network.peer.port", i64::from(ep.peer.port()));
        // The connection seen from this end: the service graph pairs it with the other end.
        a.push("network.local.address", ep.local.ip().to_string());
        a.push("network.local.port", i64::from(ep.local.port()));
    }
    a.push("network.protocol.version", Value::fixed(req.version.as_str()));
    if let Some(ua) = &req.headers.user_agent {
        a.push("user_agent.original", ua.as_str());
    }
    a.push("http.request.body.size", body_size(ex.request_body));
    if ex.answered {
        a.push("http.response.body.size", body_size(ex.response_body));
    }

    let error_threshold = match conn.side {
        Side::Server => 500,
        Side::Client => 400,
    };
    let status = if let Some(kind) = outcome.error_type() {
        a.push("error.type", Value::fixed(kind));
        Status::Error {
            message: match outcome {
                Outcome::Timeout => "no response before the connection went idle".into(),
                _ => "connection closed before the response".into(),
            },
        }
    } else if let Some(code) = status_code.filter(|&c| c >= error_threshold) {
        a.push("error.type", code.to_string());
        // The status code says it all: semantic conventions leave the description empty.
        Status::Error { message: String::new() }
    } else {
        Status::Unset
    };

    Span {
        resource: conn.resource.clone(),
        trace_id: ids.trace_id,
        span_id: ids.span_id,
        parent_span_id: ids.parent_span_id,
        trace_state: ids.trace_state,
        flags: ids.flags,
        name: if method == "_OTHER" { "HTTP".to_owned() } else { method.to_owned() },
        kind: match conn.side {
            Side::Server => SpanKind::Server,
            Side::Client => SpanKind::Client,
        },
        start_unix_nano: clock.to_unix_nanos(ex.start_ts),
        end_unix_nano: clock.to_unix_nanos(end_ts.max(ex.start_ts)),
        attributes: a,
        status,
    }
}

fn body_size(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Known methods as they are, anything else `_OTHER` (OpenTelemetry HTTP conventions).
pub(crate) fn normalise_method(method: &str) -> &'static str {
    KNOWN_METHODS.iter().find(|m| **m == method).copied().unwrap_or("_OTHER")
}

/// The path of a request target without query or fragment, and whether it had a query.
/// None for targets without a path (`*`, CONNECT's `host:port`).
pub(crate) fn split_target(target: &str) -> (Option<&str>, bool) {
    let scheme_end = ["http://", "https://"]
        .iter()
        .find(|s| target.get(..s.len()).is_some_and(|p| p.eq_ignore_ascii_case(s)))
        .map(|s| s.len());
    let rest = match scheme_end {
        Some(n) => {
            let after = &target[n..];
            match after.find(['/', '?', '#']) {
                Some(i) => &after[i..],
                None => "",
            }
        }
        None if target.starts_with('/') => target,
        None => return (None, false),
    };
    let rest = rest.split('#').next().unwrap_or_default();
    let (path, has_query) = match rest.split_once('?') {
        Some((p, _)) => (p, true),
        None => (rest, false),
    };
    (Some(if path.is_empty() { "/" } else { path }), has_query)
}

/// A Host header split into host (IPv6 brackets removed) and port.
pub(crate) fn split_host(host: &str) -> Option<(&str, Option<u16>)> {
    let host = host.trim();
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let (inner, after) = rest.split_once(']')?;
        (inner, after.strip_prefix(':'))
    } else {
        match host.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, Some(p)),
            _ => (host, None),
        }
    };
    if name.is_empty() {
        return None;
    }
    Some((name, port.and_then(|p| p.parse().ok())))
}

fn authority_of(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(a) => a.to_string(),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(split_target("/a/b?x=1#f"), (Some("/a/b"), true));
        assert_eq!(split_target("/a"), (Some("/a"), false));
        assert_eq!(split_target("/?"), (Some("/"), true));
        assert_eq!(split_target("http://h:8/p?q"), (Some("/p"), true));
        assert_eq!(split_target("HTTP://h?q"), (Some("/"), true));
        assert_eq!(split_target("http://h"), (Some("/"), false));
        assert_eq!(split_target("*"), (None, false));
        assert_eq!(split_target("example.com:443"), (None, false));
    }

    #[test]
    fn hosts() {
        assert_eq!(split_host("example.com"), Some(("example.com", None)));
        assert_eq!(split_host("example.com:8080"), Some(("example.com", Some(8080))));
        assert_eq!(split_host("[::1]:9000"), Some(("::1", Some(9000))));
        assert_eq!(split_host("[::1]"), Some(("::1", None)));
        assert_eq!(split_host("::1"), Some(("::1", None)));
        assert_eq!(split_host("h:notaport"), Some(("h", None)));
        assert_eq!(split_host(""), None);
        assert_eq!(split_host("[::1"), None);
    }

    #[test]
    fn methods() {
        assert_eq!(normalise_method("GET"), "GET");
        assert_eq!(normalise_method("get"), "_OTHER");
        assert_eq!(normalise_method("PROPFIND"), "_OTHER");
    }
}
