//! Which failures are retried (OTLP spec, "Failures" and "Throttling") and how long to wait.

use std::time::{Duration, SystemTime};

use hyper::{HeaderMap, StatusCode, header::RETRY_AFTER};
use rand::Rng as _;
use tokio::time::Instant;
use tonic::Code;
use tonic_types::StatusExt as _;

/// One failed attempt (or the final failure of a batch).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// Short, stable category, used to rate-limit the warnings ("unavailable", "http 400", ...).
    pub kind: String,
    /// Whether the spec allows sending the same data again.
    pub retryable: bool,
    /// Delay the server asked for (HTTP `Retry-After`, gRPC `RetryInfo`).
    pub retry_after: Option<Duration>,
    /// What went wrong, for the log.
    pub message: String,
}

impl Failure {
    /// A failure that is worth retrying (connection refused, timeout).
    pub fn transient(kind: &str, message: impl Into<String>) -> Failure {
        Failure {
            kind: kind.to_owned(),
            retryable: true,
            retry_after: None,
            message: message.into(),
        }
    }
    /// A failure that retrying cannot fix.
    pub fn permanent(kind: &str, message: impl Into<String>) -> Failure {
        Failure {
            kind: kind.to_owned(),
            retryable: false,
            retry_after: None,
            message: message.into(),
        }
    }
}

/// Retry schedule: exponential backoff with jitter, bounded in attempts and by a deadline.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Delay before the first retry (before jitter).
    pub initial_backoff: Duration,
    /// Longest computed delay between two attempts.
    pub max_backoff: Duration,
    /// Longest server-requested delay that is honoured; a longer one ends the retries.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// Delay before retry number `retry` (0 for the first retry): `initial * 2^retry` capped at
    /// `max_backoff`, then scaled by a random factor in [0.5, 1.0].
    pub fn backoff(&self, retry: u32) -> Duration {
        let base = self
            .initial_backoff
            .saturating_mul(2u32.saturating_pow(retry.min(16)))
            .min(self.max_backoff);
        base.mul_f64(rand::rng().random_range(0.5..=1.0))
    }

    /// Runs `attempt` until it succeeds, fails for good, runs out of attempts, or the next wait
    /// would end after `deadline`. Returns the result and the number of attempts made.
    pub async fn run<T, F, Fut>(&self, deadline: Instant, mut attempt: F) -> (Result<T, Failure>, u32)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let mut made = 0;
        loop {
            made += 1;
            let failure = match attempt().await {
                Ok(v) => return (Ok(v), made),
                Err(f) => f,
            };
            if !failure.retryable || made >= self.max_attempts {
                return (Err(failure), made);
            }
            let wait = match failure.retry_after {
                Some(d) if d > self.max_retry_after => return (Err(failure), made),
                Some(d) => d,
                None => self.backoff(made - 1),
            };
            if Instant::now() + wait >= deadline {
                return (Err(failure), made);
            }
            tokio::time::sleep(wait).await;
        }
    }
}

/// gRPC: UNAVAILABLE, ABORTED, CANCELLED, DEADLINE_EXCEEDED, OUT_OF_RANGE and DATA_LOSS are
/// retryable; RESOURCE_EXHAUSTED only when the server sent a `RetryInfo`. A `RetryInfo` delay
/// is honoured on any retryable code.
pub fn classify_grpc(status: &tonic::Status) -> Failure {
    let retry_after = status.get_details_retry_info().and_then(|info| info.retry_delay);
    let retryable = match status.code() {
        Code::Unavailable | Code::Aborted | Code::Cancelled | Code::DeadlineExceeded | Code::OutOfRange | Code::DataLoss => true,
        Code::ResourceExhausted => retry_after.is_some(),
        _ => false,
    };
    let kind = format!("grpc {:?}", status.code()).to_ascii_lowercase();
    Failure {
        kind,
        retryable,
        retry_after: if retryable { retry_after } else { None },
        message: status.message().to_owned(),
    }
}

/// HTTP: 429, 502, 503 and 504 are retryable, honouring `Retry-After`; everything else is not.
/// The message comes from a `google.rpc.Status` body when there is one.
pub fn classify_http(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Failure {
    let retryable = matches!(status.as_u16(), 429 | 502 | 503 | 504);
    let retry_after = if retryable {
        headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()))
    } else {
        None
    };
    Failure {
        kind: format!("http {}", status.as_u16()),
        retryable,
        retry_after,
        message: error_body_message(body),
    }
}

/// `Retry-After` as delay-seconds or an HTTP date (a date in the past means "now").
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The OTLP/HTTP error body is a protobuf `google.rpc.Status`; fall back to (short) text.
fn error_body_message(body: &[u8]) -> String {
    use prost::Message as _;
    if body.is_empty() {
        return String::new();
    }
    if let Ok(status) = tonic_types::Status::decode(body)
        && !status.message.is_empty()
    {
        return status.message;
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(200) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;
    use tonic_types::ErrorDetails;

    #[test]
    fn grpc_codes() {
        for code in [
            Code::Unavailable,
            Code::Aborted,
            Code::Cancelled,
            Code::DeadlineExceeded,
            Code::OutOfRange,
            Code::DataLoss,
        ] {
            assert!(classify_grpc(&tonic::Status::new(code, "x")).retryable, "{code:?}");
        }
        for code in [
            Code::InvalidArgument,
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::Unimplemented,
            Code::Internal,
        ] {
            assert!(!classify_grpc(&tonic::Status::new(code, "x")).retryable, "{code:?}");
        }
        let plain = classify_grpc(&tonic::Status::new(Code::ResourceExhausted, "full"));
        assert!(!plain.retryable, "RESOURCE_EXHAUSTED without RetryInfo is final");
        let with_info = tonic::Status::with_error_details(
            Code::ResourceExhausted,
            "slow down",
            ErrorDetails::with_retry_info(Some(Duration::from_millis(1500))),
        );
        let f = classify_grpc(&with_info);
        assert!(f.retryable);
        assert_eq!(f.retry_after, Some(Duration::from_millis(1500)));
        assert_eq!(f.kind, "grpc resourceexhausted");
        assert_eq!(f.message, "slow down");
    }

    #[test]
    fn http_statuses_and_retry_after() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("3"));
        for code in [429, 502, 503, 504] {
            let f = classify_http(StatusCode::from_u16(code).unwrap(), &headers, b"");
            assert!(f.retryable, "{code}");
            assert_eq!(f.retry_after, Some(Duration::from_secs(3)));
        }
        for code in [400, 401, 403, 404, 413, 500] {
            let f = classify_http(StatusCode::from_u16(code).unwrap(), &headers, b"nope");
            assert!(!f.retryable, "{code}");
            assert_eq!(f.retry_after, None);
            assert_eq!(f.message, "nope");
        }
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let later = httpdate::fmt_http_date(now + Duration::from_secs(7));
        assert_eq!(parse_retry_after(&later, now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after(&httpdate::fmt_http_date(now - Duration::from_secs(7)), now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn error_body_is_decoded_from_google_rpc_status() {
        use prost::Message as _;
        let body = tonic_types::Status {
            code: 3,
            message: "bad span id".into(),
            details: vec![],
        }
        .encode_to_vec();
        assert_eq!(
            classify_http(StatusCode::BAD_REQUEST, &HeaderMap::new(), &body).message,
            "bad span id"
        );
        let long = "x".repeat(500);
        assert_eq!(error_body_message(long.as_bytes()).len(), 203);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy::default();
        for retry in 0..10 {
            let d = p.backoff(retry);
            let base = (p.initial_backoff * 2u32.pow(retry)).min(p.max_backoff);
            assert!(d >= base / 2 && d <= base, "retry {retry}: {d:?} vs {base:?}");
        }
        assert!(p.backoff(u32::MAX) <= p.max_backoff);
    }

    #[tokio::test]
    async fn run_stops_on_permanent_failure_and_after_max_attempts() {
        let p = RetryPolicy {
            initial_backoff: Duration::from_millis(1),
            ..RetryPolicy::default()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let (r, n) = p.run(deadline, || async { Err::<(), _>(Failure::transient("t", "down")) }).await;
        assert_eq!((r.is_err(), n), (true, 5));
        let (r, n) = p.run(deadline, || async { Err::<(), _>(Failure::permanent("p", "bad")) }).await;
        assert_eq!((r.is_err(), n), (true, 1));
        let mut calls = 0;
        let (r, n) = p
            .run(deadline, || {
                calls += 1;
                let n = calls;
                async move { if n < 3 { Err(Failure::transient("t", "down")) } else { Ok(n) } }
            })
            .await;
        assert_eq!((r, n), (Ok(3), 3));
        // A wait that would pass the deadline ends the retries at once.
        let slow = RetryPolicy {
            initial_backoff: Duration::from_secs(60),
            max_backoff: Duration::from_secs(60),
            ..p
        };
        let (r, n) = slow
            .run(Instant::now() + Duration::from_secs(1), || async {
                Err::<(), _>(Failure::transient("t", "down"))
            })
            .await;
        assert_eq!((r.is_err(), n), (true, 1));
    }
}
