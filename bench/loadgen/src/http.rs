//! Just enough HTTP/1.1 for the load generator: where a response head ends, its status, its
//! Content-Length and whether the server closes the connection after it.

#[derive(Debug, PartialEq)]
pub struct Head {
    pub status: u16,
    pub head_len: usize,
    pub content_length: Option<u64>,
    pub close: bool,
}

/// Parses a complete response head (status line and headers); None while it is incomplete.
pub fn parse_head(bytes: &[u8]) -> Option<Head> {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let text = String::from_utf8_lossy(&bytes[..end]);
    let mut lines = text.split("\r\n");
    let status = lines
        .next()?
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut content_length = None;
    let mut close = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = value.parse().ok();
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    Some(Head {
        status,
        head_len: end + 4,
        content_length,
        close,
    })
}

/// The request the generator sends, every time.
pub fn request(host: &str, path: &str, close: bool) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tapwire-loadgen\r\n{}\r\n",
        if close { "Connection: close\r\n" } else { "" }
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_response_heads() {
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"),
            None
        );
        let h = parse_head(
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 12\r\nConnection: close\r\n\r\nbody",
        )
        .unwrap();
        assert_eq!(
            h,
            Head {
                status: 404,
                head_len: 65,
                content_length: Some(12),
                close: true
            }
        );
        let h = parse_head(b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\n").unwrap();
        assert_eq!(h.content_length, None);
        assert!(!h.close);
    }

    #[test]
    fn builds_requests() {
        assert_eq!(
            request("h:1", "/f", true),
            b"GET /f HTTP/1.1\r\nHost: h:1\r\nUser-Agent: tapwire-loadgen\r\nConnection: close\r\n\r\n"
        );
        assert!(
            !String::from_utf8(request("h:1", "/f", false))
                .unwrap()
                .contains("close")
        );
    }
}
