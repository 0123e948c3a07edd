//! `http.route` without cardinality blow-up.
//!
//! In order: (1) user-configured patterns such as `/users/{id}` or `/static/*`; (2) a heuristic
//! that replaces path segments that look like identifiers (numbers, UUIDs, hex strings, long
//! random tokens) with `{id}`; (3) a per-service cap on distinct routes, past which every new
//! route becomes [`OVERFLOW_ROUTE`] and is counted. The raw path never becomes a metric label.

use std::collections::{HashMap, HashSet};

/// The catch-all route once a service has reached its cap of distinct routes.
pub const OVERFLOW_ROUTE: &str = "/{overflow}";
/// Placeholder for a segment that looks like an identifier.
pub const ID_PLACEHOLDER: &str = "{id}";

/// A user-configured route pattern: literal segments, `{name}` for exactly one segment, and a
/// final `*` (or `{name*}`) for the rest of the path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    segments: Vec<Seg>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Seg {
    Literal(String),
    One,
    Rest,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PatternError {
    #[error("route pattern {0:?} must start with '/'")]
    NoLeadingSlash(String),
    #[error("route pattern {0:?}: a '*' or '{{name*}}' segment may only come last")]
    RestNotLast(String),
    #[error("route pattern {0:?}: unbalanced '{{' or '}}' in a segment")]
    Unbalanced(String),
}

impl Pattern {
    pub fn parse(text: &str) -> Result<Pattern, PatternError> {
        if !text.starts_with('/') {
            return Err(PatternError::NoLeadingSlash(text.into()));
        }
        let parts: Vec<&str> = text[1..].split('/').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (i, p) in parts.iter().enumerate() {
            let seg = if *p == "*" || (p.starts_with('{') && p.ends_with("*}")) {
                if i + 1 != parts.len() {
                    return Err(PatternError::RestNotLast(text.into()));
                }
                Seg::Rest
            } else if p.starts_with('{') && p.ends_with('}') && p.len() >= 2 {
                Seg::One
            } else if p.contains('{') || p.contains('}') {
                return Err(PatternError::Unbalanced(text.into()));
            } else {
                Seg::Literal((*p).to_owned())
            };
            segments.push(seg);
        }
        Ok(Pattern { text: text.to_owned(), segments })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// True when `path` (no query string) matches this pattern.
    pub fn matches(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix('/') else { return false };
        let mut parts = rest.split('/');
        for seg in &self.segments {
            match seg {
                Seg::Rest => return true,
                Seg::One => match parts.next() {
                    Some(p) if !p.is_empty() => {}
                    _ => return false,
                },
                Seg::Literal(l) => {
                    if parts.next() != Some(l.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }
}

/// True for a path segment that is an identifier rather than part of a route.
pub fn looks_like_id(seg: &str) -> bool {
    let len = seg.len();
    if len == 0 {
        return false;
    }
    let digits = seg.bytes().filter(u8::is_ascii_digit).count();
    // 123, 2024-01-31 style numbers.
    if seg.bytes().all(|b| b.is_ascii_digit() || b == b'-' || b == b'.' || b == b'_') && digits > 0 {
        return true;
    }
    // UUID 8-4-4-4-12.
    if len == 36 && seg.bytes().enumerate().all(|(i, b)| if matches!(i, 8 | 13 | 18 | 23) { b == b'-' } else { b.is_ascii_hexdigit() }) {
        return true;
    }
    // Hex strings (hashes, object ids) of 8+ characters that contain a digit.
    if len >= 8 && digits > 0 && seg.bytes().all(|b| b.is_ascii_hexdigit()) {
        return true;
    }
    // Long opaque tokens: 16+ characters mixing letters and digits (base64url, ULIDs, keys).
    if len >= 16 && digits > 0 && seg.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'=') {
        return true;
    }
    // Anything very long is not a route segment either.
    len > 64
}

/// Replaces identifier-like segments with `{id}`.
pub fn templatize(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for (i, seg) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(if looks_like_id(seg) { ID_PLACEHOLDER } else { seg });
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// Where a route came from, for diagnostics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteSource {
    Configured,
    Heuristic,
    Overflow,
}

/// Routes per service, bounded.
#[derive(Debug)]
pub struct RouteTable {
    patterns: Vec<Pattern>,
    max_routes_per_service: usize,
    seen: HashMap<String, HashSet<String>>,
    overflowed: u64,
}

impl RouteTable {
    pub fn new(patterns: Vec<Pattern>, max_routes_per_service: usize) -> Self {
        RouteTable { patterns, max_routes_per_service, seen: HashMap::new(), overflowed: 0 }
    }

    /// The route of `path` (without query string) for `service`.
    pub fn route(&mut self, service: &str, path: &str) -> (String, RouteSource) {
        let (route, source) = match self.patterns.iter().find(|p| p.matches(path)) {
            Some(p) => (p.as_str().to_owned(), RouteSource::Configured),
            None => (templatize(path), RouteSource::Heuristic),
        };
        if !self.seen.contains_key(service) {
            self.seen.insert(service.to_owned(), Default::default());
        }
        let Some(seen) = self.seen.get_mut(service) else { return (route, source) };
        if seen.contains(&route) {
            return (route, source);
        }
        if seen.len() >= self.max_routes_per_service {
            self.overflowed += 1;
            return (OVERFLOW_ROUTE.to_owned(), RouteSource::Overflow);
        }
        seen.insert(route.clone());
        (route, source)
    }

    /// Requests whose route went to [`OVERFLOW_ROUTE`].
    pub fn overflowed(&self) -> u64 {
        self.overflowed
    }

    /// Forgets a service's routes (when it goes away).
    pub fn forget(&mut self, service: &str) {
        self.seen.remove(service);
    }
}

impl Default for RouteTable {
    fn default() -> Self {
        RouteTable::new(Vec::new(), 500)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_become_placeholders() {
        assert_eq!(templatize("/items/123"), "/items/{id}");
        assert_eq!(templatize("/users/550e8400-e29b-41d4-a716-446655440000/orders/7"), "/users/{id}/orders/{id}");
        assert_eq!(templatize("/blobs/9f86d081884c7d65"), "/blobs/{id}");
        assert_eq!(templatize("/t/AbCdEf0123456789xyz"), "/t/{id}");
        assert_eq!(templatize("/api/v1/search"), "/api/v1/search");
        assert_eq!(templatize("/healthz"), "/healthz");
        assert_eq!(templatize("/"), "/");
        assert_eq!(templatize(""), "/");
        assert_eq!(templatize("/deadbeef"), "/deadbeef", "hex words without digits stay");
        assert_eq!(templatize("/reports/2024-01-31"), "/reports/{id}");
    }

    #[test]
    fn configured_patterns_win() {
        let p = vec![Pattern::parse("/users/{user}/profile").unwrap(), Pattern::parse("/static/*").unwrap()];
        let mut t = RouteTable::new(p, 10);
        assert_eq!(t.route("svc", "/users/alice/profile"), ("/users/{user}/profile".into(), RouteSource::Configured));
        assert_eq!(t.route("svc", "/static/css/site.css"), ("/static/*".into(), RouteSource::Configured));
        assert_eq!(t.route("svc", "/users/alice"), ("/users/alice".into(), RouteSource::Heuristic));
        assert!(!Pattern::parse("/users/{id}").unwrap().matches("/users/"));
        assert!(!Pattern::parse("/users/{id}").unwrap().matches("/users/1/x"));
    }

    #[test]
    fn bad_patterns_are_clear_errors() {
        assert_eq!(Pattern::parse("users"), Err(PatternError::NoLeadingSlash("users".into())));
        assert!(matches!(Pattern::parse("/a/*/b"), Err(PatternError::RestNotLast(_))));
        assert!(matches!(Pattern::parse("/a/{b"), Err(PatternError::Unbalanced(_))));
    }

    #[test]
    fn cap_sends_new_routes_to_overflow_per_service() {
        let mut t = RouteTable::new(Vec::new(), 3);
        for name in ["a", "b", "c"] {
            assert_eq!(t.route("svc", &format!("/{name}")).1, RouteSource::Heuristic);
        }
        assert_eq!(t.route("svc", "/d"), (OVERFLOW_ROUTE.into(), RouteSource::Overflow));
        assert_eq!(t.route("svc", "/a").0, "/a", "known routes keep working");
        assert_eq!(t.route("other", "/d").0, "/d", "the cap is per service");
        assert_eq!(t.overflowed(), 1);
    }
}
