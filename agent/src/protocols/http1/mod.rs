//! HTTP/1.x: message framing and head parsing over captured byte streams.
//!
//! [`Http1Stream`] follows one direction of one connection. It is fed what the kernel saw per
//! syscall, a timestamp, the byte count and the captured prefix of those bytes, and reports
//! message heads and message ends ([`Http1Event`]). Uncaptured bytes (the tail of a large read
//! or write) are skipped by count: body framing survives them, heads cut by them are parsed as
//! far as they go.

mod head;
mod stream;

pub use head::{Head, HeadError, Headers, RequestHead, ResponseHead, Version, parse_request, parse_response, parse_truncated};
pub use stream::{
    EndKind, Http1Event, Http1Stream, MessageKind, NoHints, ParseError, RequestHint, RequestHints, Start, StreamConfig,
};

/// Methods `sniff` accepts as the start of an HTTP/1 conversation (the OpenTelemetry list).
pub const KNOWN_METHODS: [&str; 9] = ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE"];

/// Outcome of a cheap look at the first bytes of a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sniff {
    /// The bytes start like an HTTP/1 message.
    Yes,
    /// They cannot be the start of one.
    No,
    /// Too few bytes to tell; so far they match.
    NeedMore,
}

/// Cheap check that `buf` starts an HTTP/1 message: a known method and a space, or "HTTP/1.".
pub fn sniff(buf: &[u8]) -> bool {
    sniff_request(buf) == Sniff::Yes || sniff_response(buf) == Sniff::Yes
}

/// Does `buf` start with a known method followed by a space?
pub fn sniff_request(buf: &[u8]) -> Sniff {
    let mut verdict = Sniff::No;
    for m in KNOWN_METHODS {
        let m = m.as_bytes();
        let n = buf.len().min(m.len());
        if buf[..n] != m[..n] {
            continue;
        }
        if n < m.len() {
            verdict = Sniff::NeedMore;
        } else {
            match buf.get(n) {
                Some(b' ') => return Sniff::Yes,
                Some(_) => {}
                None => verdict = Sniff::NeedMore,
            }
        }
    }
    verdict
}

/// Does `buf` start with "HTTP/1."?
pub fn sniff_response(buf: &[u8]) -> Sniff {
    const PREFIX: &[u8] = b"HTTP/1.";
    let n = buf.len().min(PREFIX.len());
    if buf[..n] != PREFIX[..n] {
        Sniff::No
    } else if n < PREFIX.len() {
        Sniff::NeedMore
    } else {
        Sniff::Yes
    }
}

/// Looser than [`sniff_request`], for later messages of a connection already known to speak
/// HTTP/1: any method token (RFC 9110 `tchar`s) followed by a space.
pub fn plausible_request(buf: &[u8]) -> Sniff {
    const MAX_METHOD: usize = 24;
    for (i, &b) in buf.iter().enumerate().take(MAX_METHOD + 1) {
        if b == b' ' {
            return if i > 0 { Sniff::Yes } else { Sniff::No };
        }
        if !is_tchar(b) {
            return Sniff::No;
        }
    }
    if buf.len() > MAX_METHOD { Sniff::No } else { Sniff::NeedMore }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniff_known_starts() {
        assert!(sniff(b"GET / HTTP/1.1\r\n"));
        assert!(sniff(b"OPTIONS * HTTP/1.1\r\n"));
        assert!(sniff(b"HTTP/1.1 200 OK\r\n"));
        assert!(sniff(b"HTTP/1.0"));
        assert!(!sniff(b"GET"));
        assert!(!sniff(b"GETX / HTTP/1.1"));
        assert!(!sniff(b"HTTP/2 200"));
        assert!(!sniff(b"\x16\x03\x01\x00"));
        assert!(!sniff(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        assert!(!sniff(b""));
    }

    #[test]
    fn sniff_is_tri_state() {
        assert_eq!(sniff_request(b""), Sniff::NeedMore);
        assert_eq!(sniff_request(b"G"), Sniff::NeedMore);
        assert_eq!(sniff_request(b"GET"), Sniff::NeedMore);
        assert_eq!(sniff_request(b"GET "), Sniff::Yes);
        assert_eq!(sniff_request(b"P"), Sniff::NeedMore, "POST, PUT and PATCH");
        assert_eq!(sniff_request(b"PU"), Sniff::NeedMore);
        assert_eq!(sniff_request(b"PUX"), Sniff::No);
        assert_eq!(sniff_request(b"get / "), Sniff::No, "methods are case-sensitive");
        assert_eq!(sniff_response(b"HTT"), Sniff::NeedMore);
        assert_eq!(sniff_response(b"HTTX"), Sniff::No);
        assert_eq!(plausible_request(b"PROPFIND /x"), Sniff::Yes);
        assert_eq!(plausible_request(b"PROPF"), Sniff::NeedMore);
        assert_eq!(plausible_request(b" GET"), Sniff::No);
        assert_eq!(plausible_request(b"G\x00T"), Sniff::No);
        assert_eq!(plausible_request(&[b'A'; 40]), Sniff::No);
    }
}
