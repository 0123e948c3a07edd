//! The built-in default exporter: one readable, aligned line per span on stdout.
//!
//! ```text
//! SERVER fastapi-app  GET /items        status=200 Unset     12.345ms  trace=4bf9…4736 span=00f0…02b7 parent=-
//! ```

use std::{fmt::Write as _, io::Write as _};

use super::{Delivery, otlp::retry::Failure};
use crate::model::{Span, SpanKind, Status, Value};

/// Column widths never grow past these; longer values just push the line.
const MAX_SERVICE_WIDTH: usize = 24;
const MAX_NAME_WIDTH: usize = 40;

/// Writes spans to stdout. Keeps the widest service and name seen so columns stay aligned
/// from one batch to the next.
#[derive(Debug, Default)]
pub struct ConsoleExporter {
    service_width: usize,
    name_width: usize,
}

impl ConsoleExporter {
    /// Prints one batch and flushes. The write runs on the blocking pool so a stalled
    /// terminal or pipe never stalls the runtime.
    pub async fn export(&mut self, spans: &[Span]) -> Result<Delivery, Failure> {
        let text = self.render(spans);
        let write = tokio::task::spawn_blocking(move || {
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes()).and_then(|()| out.flush())
        });
        match write.await {
            Ok(Ok(())) => Ok(Delivery {
                accepted: spans.len(),
                rejected: 0,
                message: None,
            }),
            Ok(Err(e)) => Err(Failure::permanent("stdout", format!("writing to stdout failed: {e}"))),
            Err(e) => Err(Failure::permanent("stdout", format!("the stdout writer stopped: {e}"))),
        }
    }

    /// The lines for one batch, each ending in a newline.
    pub fn render(&mut self, spans: &[Span]) -> String {
        let cleaned: Vec<(String, String)> = spans.iter().map(|s| (clean(&s.resource.service_name), clean(&s.name))).collect();
        for (service, name) in &cleaned {
            self.service_width = self.service_width.max(service.chars().count()).min(MAX_SERVICE_WIDTH);
            self.name_width = self.name_width.max(name.chars().count()).min(MAX_NAME_WIDTH);
        }
        let mut out = String::with_capacity(spans.len() * 160);
        for (span, (service, name)) in spans.iter().zip(&cleaned) {
            self.line(&mut out, span, service, name);
        }
        out
    }

    fn line(&self, out: &mut String, span: &Span, service: &str, name: &str) {
        let kind = match span.kind {
            SpanKind::Server => "SERVER",
            SpanKind::Client => "CLIENT",
        };
        let http_status = match span.attributes.get("http.response.status_code") {
            Some(Value::Int(code)) => code.to_string(),
            Some(other) => clean(&other.to_string()),
            None => "-".to_owned(),
        };
        let status = match &span.status {
            Status::Unset => "Unset",
            Status::Ok => "Ok",
            Status::Error { .. } => "Error",
        };
        let millis = span.duration_ns() as f64 / 1e6;
        let parent = span.parent_span_id.map_or_else(|| "-".to_owned(), hex::encode);
        // Writing into a String cannot fail.
        let _ = write!(
            out,
            "{kind} {service:<sw$}  {name:<nw$}  status={http_status:<3} {status:<5} {millis:>10.3}ms  trace={} span={} parent={parent}",
            hex::encode(span.trace_id),
            hex::encode(span.span_id),
            sw = self.service_width,
            nw = self.name_width,
        );
        if let Status::Error { message } = &span.status
            && !message.is_empty()
        {
            let _ = write!(out, "  error={:?}", clean(message));
        }
        out.push('\n');
    }
}

/// Names come from captured traffic: never let control characters reach the terminal.
fn clean(s: &str) -> String {
    if s.chars().any(char::is_control) {
        s.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::{Attributes, Resource};

    fn span(service: &str, name: &str, kind: SpanKind, status: Status, code: Option<i64>, parent: Option<[u8; 8]>) -> Span {
        let mut attributes = Attributes::default();
        if let Some(code) = code {
            attributes.push("http.response.status_code", code);
        }
        Span {
            resource: Arc::new(Resource {
                service_name: service.into(),
                attributes: Attributes::default(),
            }),
            trace_id: [0x4b; 16],
            span_id: [0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08],
            parent_span_id: parent,
            trace_state: String::new(),
            flags: 1,
            name: name.into(),
            kind,
            start_unix_nano: 1_000_000_000,
            end_unix_nano: 1_012_345_678,
            attributes,
            status,
        }
    }

    #[test]
    fn renders_aligned_lines() {
        let mut console = ConsoleExporter::default();
        let text = console.render(&[
            span("fastapi-app", "GET /items", SpanKind::Server, Status::Unset, Some(200), None),
            span(
                "api",
                "POST /orders/{id}",
                SpanKind::Client,
                Status::Error {
                    message: "HTTP 503".into(),
                },
                Some(503),
                Some([0xaa; 8]),
            ),
            span("api", "GET /", SpanKind::Server, Status::Ok, None, None),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "SERVER fastapi-app  GET /items         status=200 Unset     12.346ms  \
             trace=4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b span=0102030405060708 parent=-"
        );
        assert_eq!(
            lines[1],
            "CLIENT api          POST /orders/{id}  status=503 Error     12.346ms  \
             trace=4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b span=0102030405060708 parent=aaaaaaaaaaaaaaaa  error=\"HTTP 503\""
        );
        assert!(
            lines[2].starts_with("SERVER api          GET /              status=-   Ok        12.346ms  "),
            "{}",
            lines[2]
        );
        assert_eq!(lines.len(), 3);
    }

    #[test]
    fn control_characters_are_replaced() {
        let mut console = ConsoleExporter::default();
        let text = console.render(&[span("svc\x1b[31m", "GET /\x07bell", SpanKind::Server, Status::Unset, None, None)]);
        assert!(text.starts_with("SERVER svc?[31m  GET /?bell  "), "{text}");
        assert_eq!(text.matches('\n').count(), 1);
    }
}
