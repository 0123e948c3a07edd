//! Keep rules: spans exported even when head sampling dropped their trace, decided when the span
//! has ended (its status and duration are known).

use crate::model::{Span, Status, Value};

/// Why a span that head sampling dropped is exported anyway (the value of
/// [`KEPT_BY_ATTRIBUTE`](super::KEPT_BY_ATTRIBUTE)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeptBy {
    /// The span has Error status.
    Error,
    /// The span took longer than the latency threshold of its service/route.
    Latency,
}

impl KeptBy {
    pub fn as_str(self) -> &'static str {
        match self {
            KeptBy::Error => "error",
            KeptBy::Latency => "latency",
        }
    }
}

/// "Keep spans slower than `threshold_ns`", for one service and/or route or for all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LatencyRule {
    /// `service.name` the rule applies to; `None`: every service.
    pub service: Option<String>,
    /// `http.route` the rule applies to (SERVER spans carry one); `None`: every route.
    pub route: Option<String>,
    /// Spans strictly longer than this are kept.
    pub threshold_ns: u64,
}

impl LatencyRule {
    /// How specific the rule is when it matches: service and route > route > service > any.
    fn specificity(&self, service: &str, route: Option<&str>) -> Option<u8> {
        let service_ok = self.service.as_deref().is_none_or(|s| s == service);
        let route_ok = match (&self.route, route) {
            (None, _) => true,
            (Some(want), Some(have)) => want == have,
            (Some(_), None) => false,
        };
        (service_ok && route_ok).then_some(u8::from(self.route.is_some()) * 2 + u8::from(self.service.is_some()))
    }
}

/// The keep rules in force.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeepRules {
    pub errors: bool,
    pub slower_than: Vec<LatencyRule>,
}

impl KeepRules {
    /// The threshold for this service and route: the most specific matching rule (the last
    /// one given among equally specific ones).
    pub fn threshold_ns(&self, service: &str, route: Option<&str>) -> Option<u64> {
        let mut best: Option<(u8, u64)> = None;
        for rule in &self.slower_than {
            if let Some(s) = rule.specificity(service, route)
                && best.is_none_or(|(b, _)| s >= b)
            {
                best = Some((s, rule.threshold_ns));
            }
        }
        best.map(|(_, t)| t)
    }

    /// Whether a rule keeps this span, and which (Error status first).
    pub fn check(&self, span: &Span) -> Option<KeptBy> {
        if self.errors && matches!(span.status, Status::Error { .. }) {
            return Some(KeptBy::Error);
        }
        if self.slower_than.is_empty() {
            return None;
        }
        let route = match span.attributes.get("http.route") {
            Some(Value::Str(r)) => Some(r.as_ref()),
            _ => None,
        };
        let threshold = self.threshold_ns(&span.resource.service_name, route)?;
        (span.duration_ns() > threshold).then_some(KeptBy::Latency)
    }
}

/// Parses `DURATION`, `SERVICE=DURATION`, `SERVICE:/route=DURATION`, `*:/route=DURATION` or
/// `/route=DURATION`; the error says what is wrong.
pub fn parse_latency_rule(text: &str) -> Result<LatencyRule, String> {
    let text = text.trim();
    let (scope, duration) = match text.rsplit_once('=') {
        Some((scope, duration)) => (Some(scope.trim()), duration),
        None => (None, text),
    };
    let threshold_ns = parse_duration(duration.trim())?;
    let (service, route) = match scope {
        None => (None, None),
        Some("") => return Err("nothing before '=': expected SERVICE, SERVICE:/route or *:/route".into()),
        Some(scope) => {
            let (service, route) = if scope.starts_with('/') {
                ("*", Some(scope))
            } else {
                match scope.find(":/") {
                    Some(i) => (&scope[..i], Some(&scope[i + 1..])),
                    None => (scope, None),
                }
            };
            let service = service.trim();
            if service.is_empty() {
                return Err("empty service name before ':/route' (use * for every service)".into());
            }
            (Some(service).filter(|s| *s != "*").map(str::to_owned), route.map(|r| r.trim().to_owned()))
        }
    };
    Ok(LatencyRule { service, route, threshold_ns })
}

/// `250ms`, `1.5s`, `100us`, `2m`, `800000ns`: a non-negative number and a unit.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    if number.is_empty() {
        return Err(format!("{text:?} is not a duration like 250ms or 1.5s"));
    }
    let scale: f64 = match unit.trim() {
        "ns" => 1.0,
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        "m" => 60e9,
        "" => return Err(format!("duration {text:?} has no unit: add ns, us, ms, s or m (e.g. 250ms)")),
        other => return Err(format!("unknown duration unit {other:?}: use ns, us, ms, s or m (e.g. 250ms)")),
    };
    let value: f64 = number.parse().map_err(|_| format!("{text:?} is not a duration like 250ms or 1.5s"))?;
    let ns = (value * scale).round();
    if !(0.0..1e18).contains(&ns) {
        return Err(format!("duration {text:?} is out of range"));
    }
    // Checked to be an integer in [0, 1e18): exact as u64.
    Ok(ns as u64)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::{Attributes, Resource, SpanKind};

    fn rule(service: Option<&str>, route: Option<&str>, threshold_ns: u64) -> LatencyRule {
        LatencyRule { service: service.map(Into::into), route: route.map(Into::into), threshold_ns }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(250_000_000));
        assert_eq!(parse_duration("1.5s"), Ok(1_500_000_000));
        assert_eq!(parse_duration("100us"), Ok(100_000));
        assert_eq!(parse_duration("100µs"), Ok(100_000));
        assert_eq!(parse_duration("2m"), Ok(120_000_000_000));
        assert_eq!(parse_duration("7ns"), Ok(7));
        assert_eq!(parse_duration("0s"), Ok(0));
        for bad in ["", "250", "ms", "1.2.3s", "-1s", "5h", "1e3ms", "999999999999m"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_duration("250").unwrap_err(), "duration \"250\" has no unit: add ns, us, ms, s or m (e.g. 250ms)");
        assert_eq!(parse_duration("fast").unwrap_err(), "\"fast\" is not a duration like 250ms or 1.5s");
        assert_eq!(parse_duration("5h").unwrap_err(), "unknown duration unit \"h\": use ns, us, ms, s or m (e.g. 250ms)");
    }

    #[test]
    fn rules() {
        assert_eq!(parse_latency_rule("500ms"), Ok(rule(None, None, 500_000_000)));
        assert_eq!(parse_latency_rule("*=500ms"), Ok(rule(None, None, 500_000_000)));
        assert_eq!(parse_latency_rule("checkout=1s"), Ok(rule(Some("checkout"), None, 1_000_000_000)));
        assert_eq!(parse_latency_rule("checkout:/pay/{id}=2s"), Ok(rule(Some("checkout"), Some("/pay/{id}"), 2_000_000_000)));
        assert_eq!(parse_latency_rule("*:/pay=2s"), Ok(rule(None, Some("/pay"), 2_000_000_000)));
        assert_eq!(parse_latency_rule("/pay=2s"), Ok(rule(None, Some("/pay"), 2_000_000_000)));
        assert_eq!(parse_latency_rule(" ns.svc:v2 = 10ms "), Ok(rule(Some("ns.svc:v2"), None, 10_000_000)));
        assert!(parse_latency_rule("=1s").is_err());
        assert!(parse_latency_rule(":/pay=1s").is_err());
        assert!(parse_latency_rule("checkout=").is_err());
        assert!(parse_latency_rule("checkout").is_err());
    }

    #[test]
    fn most_specific_rule_wins() {
        let k = KeepRules {
            errors: false,
            slower_than: vec![
                rule(Some("a"), Some("/x"), 1),
                rule(None, Some("/x"), 2),
                rule(Some("a"), None, 3),
                rule(None, None, 4),
                rule(None, None, 5),
            ],
        };
        assert_eq!(k.threshold_ns("a", Some("/x")), Some(1));
        assert_eq!(k.threshold_ns("b", Some("/x")), Some(2));
        assert_eq!(k.threshold_ns("a", Some("/y")), Some(3));
        assert_eq!(k.threshold_ns("a", None), Some(3));
        // The last of equally specific rules.
        assert_eq!(k.threshold_ns("b", None), Some(5));
        assert_eq!(KeepRules::default().threshold_ns("a", None), None);
    }

    fn span(service: &str, route: Option<&str>, duration_ns: u64, status: Status) -> Span {
        let mut attributes = Attributes::default();
        if let Some(r) = route {
            attributes.push("http.route", r);
        }
        Span {
            resource: Arc::new(Resource { service_name: service.into(), attributes: Attributes::default() }),
            trace_id: [1; 16],
            span_id: [2; 8],
            parent_span_id: None,
            trace_state: String::new(),
            flags: 1,
            name: "GET".into(),
            kind: SpanKind::Server,
            start_unix_nano: 1_000,
            end_unix_nano: 1_000 + duration_ns,
            attributes,
            status,
        }
    }

    #[test]
    fn check_errors_then_latency() {
        let k = KeepRules { errors: true, slower_than: vec![rule(None, None, 100), rule(Some("s"), Some("/slow"), 1000)] };
        let err = Status::Error { message: String::new() };
        assert_eq!(k.check(&span("s", None, 0, err.clone())), Some(KeptBy::Error));
        assert_eq!(k.check(&span("s", None, 101, Status::Unset)), Some(KeptBy::Latency));
        assert_eq!(k.check(&span("s", None, 100, Status::Unset)), None, "strictly slower");
        assert_eq!(k.check(&span("s", Some("/slow"), 1000, Status::Unset)), None);
        assert_eq!(k.check(&span("s", Some("/slow"), 1001, Status::Unset)), Some(KeptBy::Latency));
        assert_eq!(k.check(&span("s", None, 50, Status::Ok)), None);
        let no_errors = KeepRules { errors: false, slower_than: Vec::new() };
        assert_eq!(no_errors.check(&span("s", None, 10_000, err)), None);
    }
}
