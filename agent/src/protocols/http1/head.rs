//! HTTP/1.x message heads: request line or status line plus the headers tapwire keeps.
//!
//! Parsing is done by `httparse`. Only the values of a fixed set of headers are kept (see
//! [`Headers`]); every other header, secrets such as `Authorization` or `Cookie` included, is
//! only counted.

/// Longest value kept for a header of interest; longer values are cut at a character boundary.
pub const MAX_VALUE_LEN: usize = 1024;
/// Headers httparse may report per message (a head is at most `max_head_bytes` anyway).
const MAX_HEADERS: usize = 128;

/// HTTP/1 minor version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

impl Version {
    /// The `network.protocol.version` value: "1.0" or "1.1".
    pub fn as_str(self) -> &'static str {
        match self {
            Version::Http10 => "1.0",
            Version::Http11 => "1.1",
        }
    }

    fn from_minor(minor: u8) -> Version {
        if minor == 0 { Version::Http10 } else { Version::Http11 }
    }
}

/// The headers tapwire looks at. Values are kept only for the fields below; the others are
/// counted in `count` (their names are not copied: a head is parsed for every request).
/// Repeated headers are joined with ", " (",") as RFC 9110 (W3C Trace Context for
/// `tracestate`) says they may be.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers {
    /// `Host`, as sent (with its port, if any).
    pub host: Option<String>,
    /// `User-Agent`.
    pub user_agent: Option<String>,
    /// W3C `traceparent`, unvalidated.
    pub traceparent: Option<String>,
    /// W3C `tracestate`.
    pub tracestate: Option<String>,
    /// Parsed `Content-Length` (repeated values must agree, else the head is rejected).
    pub content_length: Option<u64>,
    /// `Transfer-Encoding`, lower-cased.
    pub transfer_encoding: Option<String>,
    /// `Connection`, lower-cased.
    pub connection: Option<String>,
    /// Headers in the head, kept or not.
    pub count: usize,
}

impl Headers {
    /// True when the last transfer coding is `chunked`.
    pub fn is_chunked(&self) -> bool {
        self.transfer_encoding
            .as_deref()
            .and_then(|te| te.rsplit(',').next())
            .is_some_and(|last| last.trim() == "chunked")
    }

    /// True when `Connection` lists `close`.
    pub fn wants_close(&self) -> bool {
        self.connection.as_deref().is_some_and(|c| c.split(',').any(|t| t.trim() == "close"))
    }
}

/// A request line and its headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead {
    /// The method token as sent (case-sensitive).
    pub method: String,
    /// The request target as sent (origin form `/p?q`, absolute form, `*`, or authority form).
    pub target: String,
    /// HTTP/1.0 or HTTP/1.1.
    pub version: Version,
    /// The headers tapwire keeps.
    pub headers: Headers,
    /// Part of the head was not captured: headers after the cut are missing.
    pub truncated: bool,
}

/// A status line and its headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    /// HTTP/1.0 or HTTP/1.1.
    pub version: Version,
    /// The status code (three digits).
    pub status: u16,
    /// The headers tapwire keeps.
    pub headers: Headers,
    /// Part of the head was not captured: headers after the cut are missing.
    pub truncated: bool,
}

/// A parsed head of either kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Head {
    Request(RequestHead),
    Response(ResponseHead),
}

/// Why a head could not be parsed.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeadError {
    /// httparse rejected the bytes.
    #[error("malformed message head")]
    Syntax(#[source] httparse::Error),
    /// The bytes stop before the end of the head.
    #[error("message head ends early")]
    Incomplete,
    /// Content-Length is not a number, or repeated with different values.
    #[error("invalid or conflicting Content-Length")]
    ContentLength,
}

fn parser_config() -> httparse::ParserConfig {
    let mut c = httparse::ParserConfig::default();
    // Be as lenient as real servers: observing traffic must not reject what they accept.
    c.allow_multiple_spaces_in_request_line_delimiters(true)
        .allow_multiple_spaces_in_response_status_delimiters(true)
        .allow_spaces_after_header_name_in_responses(true)
        .allow_obsolete_multiline_headers_in_responses(true)
        .ignore_invalid_headers_in_requests(true)
        .ignore_invalid_headers_in_responses(true);
    c
}

/// Parses a complete request head (`buf` ends with the empty line). Returns the head and the
/// number of bytes it took.
pub fn parse_request(buf: &[u8]) -> Result<(RequestHead, usize), HeadError> {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut raw);
    match parser_config().parse_request(&mut req, buf) {
        Ok(httparse::Status::Complete(n)) => {
            let headers = collect(req.headers)?;
            let head = RequestHead {
                method: req.method.unwrap_or_default().to_owned(),
                target: req.path.unwrap_or_default().to_owned(),
                version: Version::from_minor(req.version.unwrap_or(1)),
                headers,
                truncated: false,
            };
            Ok((head, n))
        }
        Ok(httparse::Status::Partial) => Err(HeadError::Incomplete),
        Err(e) => Err(HeadError::Syntax(e)),
    }
}

/// Parses a complete response head (`buf` ends with the empty line).
pub fn parse_response(buf: &[u8]) -> Result<(ResponseHead, usize), HeadError> {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut raw);
    match parser_config().parse_response(&mut resp, buf) {
        Ok(httparse::Status::Complete(n)) => {
            let headers = collect(resp.headers)?;
            let head = ResponseHead {
                version: Version::from_minor(resp.version.unwrap_or(1)),
                status: resp.code.unwrap_or_default(),
                headers,
                truncated: false,
            };
            Ok((head, n))
        }
        Ok(httparse::Status::Partial) => Err(HeadError::Incomplete),
        Err(e) => Err(HeadError::Syntax(e)),
    }
}

/// Best effort for a head whose end was not captured: parses the complete lines of `partial`
/// (a prefix of a head) as if the head ended there, and marks the result truncated.
pub fn parse_truncated(partial: &[u8], request: bool) -> Result<Head, HeadError> {
    let Some(last_nl) = partial.iter().rposition(|&b| b == b'\n') else {
        return Err(HeadError::Incomplete);
    };
    let mut buf = Vec::with_capacity(last_nl + 3);
    buf.extend_from_slice(&partial[..=last_nl]);
    buf.extend_from_slice(b"\r\n");
    let first_line_end = partial.iter().position(|&b| b == b'\n').unwrap_or(last_nl);
    let attempt = |b: &[u8]| -> Result<Head, HeadError> {
        if request {
            parse_request(b).map(|(mut h, _)| {
                h.truncated = true;
                Head::Request(h)
            })
        } else {
            parse_response(b).map(|(mut h, _)| {
                h.truncated = true;
                Head::Response(h)
            })
        }
    };
    match attempt(&buf) {
        Ok(h) => Ok(h),
        // A header line cut in a bad place: fall back to the start line alone.
        Err(_) if first_line_end < last_nl => {
            let mut start = partial[..=first_line_end].to_vec();
            start.extend_from_slice(b"\r\n");
            attempt(&start)
        }
        Err(e) => Err(e),
    }
}

fn collect(raw: &[httparse::Header<'_>]) -> Result<Headers, HeadError> {
    let mut h = Headers::default();
    for header in raw {
        let name = header.name;
        h.count += 1;
        // Values are kept only for the headers listed here; everything else (Authorization,
        // Cookie, Set-Cookie, Proxy-Authorization, X-Api-Key, ...) is never copied.
        let slot = if name.eq_ignore_ascii_case("host") {
            &mut h.host
        } else if name.eq_ignore_ascii_case("user-agent") {
            &mut h.user_agent
        } else if name.eq_ignore_ascii_case("traceparent") {
            &mut h.traceparent
        } else if name.eq_ignore_ascii_case("tracestate") {
            &mut h.tracestate
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            &mut h.transfer_encoding
        } else if name.eq_ignore_ascii_case("connection") {
            &mut h.connection
        } else if name.eq_ignore_ascii_case("content-length") {
            let v = parse_content_length(header.value).ok_or(HeadError::ContentLength)?;
            if h.content_length.is_some_and(|prev| prev != v) {
                return Err(HeadError::ContentLength);
            }
            h.content_length = Some(v);
            continue;
        } else {
            continue;
        };
        let value = String::from_utf8_lossy(header.value);
        let value = value.trim();
        match slot {
            Some(prev) => {
                if prev.len() < MAX_VALUE_LEN {
                    prev.push_str(", ");
                    prev.push_str(value);
                }
            }
            None => *slot = Some(value.to_owned()),
        }
        if let Some(v) = slot.as_mut() {
            truncate(v, MAX_VALUE_LEN);
        }
    }
    for v in [&mut h.transfer_encoding, &mut h.connection].into_iter().flatten() {
        v.make_ascii_lowercase();
    }
    Ok(h)
}

/// `Content-Length`: digits only; a list of identical values ("5, 5") is accepted as RFC 9110 allows.
fn parse_content_length(value: &[u8]) -> Option<u64> {
    let mut result: Option<u64> = None;
    for part in value.split(|&b| b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = part.iter().fold(0u64, |acc, &d| acc * 10 + u64::from(d - b'0'));
        if result.is_some_and(|r| r != n) {
            return None;
        }
        result = Some(n);
    }
    result
}

fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_keeps_only_headers_of_interest() {
        let raw = b"GET /a?b=1 HTTP/1.1\r\nHost: example.com:8080\r\nUser-Agent: curl/8\r\n\
            Authorization: Bearer s3cr3t\r\nCookie: sid=s3cr3t\r\nX-Api-Key: s3cr3t\r\n\
            Content-Length: 5\r\nConnection: Keep-Alive\r\n\r\nhello";
        let (h, n) = parse_request(raw).unwrap();
        assert_eq!(n, raw.len() - 5);
        assert_eq!(h.method, "GET");
        assert_eq!(h.target, "/a?b=1");
        assert_eq!(h.version, Version::Http11);
        assert_eq!(h.headers.host.as_deref(), Some("example.com:8080"));
        assert_eq!(h.headers.user_agent.as_deref(), Some("curl/8"));
        assert_eq!(h.headers.content_length, Some(5));
        assert_eq!(h.headers.connection.as_deref(), Some("keep-alive"));
        assert_eq!(h.headers.count, 7);
        assert!(!format!("{h:?}").contains("s3cr3t"));
    }

    #[test]
    fn response_and_framing_headers() {
        let raw = b"HTTP/1.0 404 Not Found\r\nTransfer-Encoding: gzip, Chunked\r\nConnection: close\r\n\r\n";
        let (h, n) = parse_response(raw).unwrap();
        assert_eq!(n, raw.len());
        assert_eq!(h.status, 404);
        assert_eq!(h.version, Version::Http10);
        assert!(h.headers.is_chunked());
        assert!(h.headers.wants_close());
        let (h, _) = parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n").unwrap();
        assert!(!h.headers.is_chunked(), "chunked must be the last coding");
    }

    #[test]
    fn content_length_rules() {
        assert_eq!(parse_content_length(b"42"), Some(42));
        assert_eq!(parse_content_length(b" 7 , 7"), Some(7));
        assert_eq!(parse_content_length(b"7, 8"), None);
        assert_eq!(parse_content_length(b"-1"), None);
        assert_eq!(parse_content_length(b""), None);
        assert_eq!(parse_content_length(b"99999999999999999999"), None);
        assert_eq!(
            parse_request(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Err(HeadError::ContentLength)
        );
    }

    #[test]
    fn repeated_tracestate_joins_and_values_are_capped() {
        let long = "a".repeat(5000);
        let raw = format!("GET / HTTP/1.1\r\ntracestate: a=1\r\ntracestate: b=2\r\nUser-Agent: {long}\r\n\r\n");
        let (h, _) = parse_request(raw.as_bytes()).unwrap();
        assert_eq!(h.headers.tracestate.as_deref(), Some("a=1, b=2"));
        assert_eq!(h.headers.user_agent.as_ref().map(String::len), Some(MAX_VALUE_LEN));
    }

    #[test]
    fn truncated_heads_keep_complete_lines() {
        let partial = b"GET /big HTTP/1.1\r\nHost: h\r\nCookie: aaaaaaaaaaaaaaaa";
        let Head::Request(h) = parse_truncated(partial, true).unwrap() else { panic!("not a request") };
        assert!(h.truncated);
        assert_eq!(h.method, "GET");
        assert_eq!(h.headers.host.as_deref(), Some("h"));
        assert_eq!(h.headers.count, 1);
        assert_eq!(parse_truncated(b"GET /only-part-of-the-line", true), Err(HeadError::Incomplete));
        let Head::Response(r) = parse_truncated(b"HTTP/1.1 200 OK\r\nX: \x01\x02", false).unwrap() else {
            panic!("not a response")
        };
        assert_eq!(r.status, 200);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(matches!(parse_request(b"\x16\x03\x01\x02\x00\r\n\r\n"), Err(HeadError::Syntax(_))));
        assert!(matches!(parse_response(b"HTTP/2 200\r\n\r\n"), Err(HeadError::Syntax(_))));
        assert_eq!(parse_request(b"GET / HTTP/1.1\r\n"), Err(HeadError::Incomplete));
    }
}
