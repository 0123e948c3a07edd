//! Golden tests for HTTP/1 correlation: every `agent/testdata/http1/*.txt` file is a sequence
//! of kernel events and the spans they must produce, exactly and in order. Unprivileged.
//!
//! File format, one directive per line, `#` starts a comment line:
//!
//! ```text
//! config max_pending_requests=2 max_head_bytes=16384 max_connections=8 idle_timeout_ms=1000
//! conn sock=1 role=server local=10.0.0.1:8080 peer=10.0.0.2:51000   # role: server|client|unknown
//! conn sock=2 role=unknown endpoints=none pid=7                       # later events use this conn
//! in  ts=1000 "GET / HTTP/1.1\r\n\r\n"             # the process read these bytes
//! out ts=2000 len=16384 "HTTP/1.1 200 OK\r\n" fill=1000
//! out ts=3000 repeat=64 step=10 len=16384 fill=1024
//! close ts=4000 [sock=1]
//! expire now=130000000000
//! span name=GET kind=server start=1000 end=2000 status=unset method=GET path=/ code=200
//! span ... error=timeout trace_id=<hex> parent=<hex>|none flags=1 trace_state="a=b"
//! span ... attr:server.port=8080 attr:error.type="500" no:url.query
//! counter parse_failures_http1=0 spans_created=3 connections_evicted=0
//! stats invalid_traceparent=1 requests_dropped=0
//! connections 0
//! forbid "s3cr3t"                                  # never in the Debug output of any span
//! ```
//!
//! `counter`, `stats`, `connections` and `forbid` hold where they appear; `span` lines are
//! compared with all spans emitted by the end of the file.
//!
//! Payload: quoted strings (escapes `\r \n \t \\ \" \0 \xHH`) and `fill=N` (N bytes of 'x'),
//! concatenated in order; `len` is the byte count the syscall moved (default: the payload
//! length; the payload is its captured prefix). `repeat`/`step` repeat an event with the
//! timestamp advancing by `step`. Span `attr:` values: quoted = string, bare integer = int,
//! anything else = string. Times are CLOCK_MONOTONIC ns; the test clock has offset 0.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tapwire::{
    capture::event::{DataEvent, Direction, Endpoints, Event, Origin, Role},
    clock::Clock,
    correlate::{CorrelateConfig, Correlator},
    discover::ResourceLookup,
    model::{Attributes, Resource, Span, SpanKind, Status, Value},
    telemetry::Counters,
};
use tapwire_common::Syscall;

struct TestResource(Arc<Resource>);

impl ResourceLookup for TestResource {
    fn resource_for(&mut self, _pid: u32, _cgroup_id: u64) -> Arc<Resource> {
        self.0.clone()
    }
}

/// One token: `key=value`, a bare word, or a quoted string.
#[derive(Clone, Debug)]
struct Token {
    key: Option<String>,
    value: String,
    quoted: bool,
}

fn tokenize(line: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let chars: Vec<char> = line.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_whitespace() {
            i += 1;
            continue;
        }
        if chars[i] == '#' {
            break;
        }
        let mut key = None;
        let start = i;
        while i < chars.len() && !chars[i].is_whitespace() && chars[i] != '=' && chars[i] != '"' {
            i += 1;
        }
        if i < chars.len() && chars[i] == '=' {
            key = Some(chars[start..i].iter().collect::<String>());
            i += 1;
        } else if i > start {
            tokens.push(Token { key: None, value: chars[start..i].iter().collect(), quoted: false });
            continue;
        }
        if i < chars.len() && chars[i] == '"' {
            i += 1;
            let mut raw = String::new();
            loop {
                match chars.get(i) {
                    None => return Err("unterminated string".into()),
                    Some('"') => break,
                    Some('\\') => {
                        raw.push('\\');
                        raw.push(*chars.get(i + 1).ok_or("dangling backslash")?);
                        i += 2;
                    }
                    Some(c) => {
                        raw.push(*c);
                        i += 1;
                    }
                }
            }
            i += 1;
            tokens.push(Token { key, value: raw, quoted: true });
        } else {
            let vstart = i;
            while i < chars.len() && !chars[i].is_whitespace() {
                i += 1;
            }
            tokens.push(Token { key, value: chars[vstart..i].iter().collect(), quoted: false });
        }
    }
    Ok(tokens)
}

/// Decodes the escapes of a quoted payload into bytes.
fn unescape(raw: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let b = raw.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let c = *b.get(i + 1).ok_or("dangling backslash")?;
        i += 2;
        match c {
            b'r' => out.push(b'\r'),
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'0' => out.push(0),
            b'\\' => out.push(b'\\'),
            b'"' => out.push(b'"'),
            b'x' => {
                let hex = raw.get(i..i + 2).ok_or("short \\x escape")?;
                out.push(u8::from_str_radix(hex, 16).map_err(|e| format!("bad \\x escape: {e}"))?);
                i += 2;
            }
            other => return Err(format!("unknown escape \\{}", other as char)),
        }
    }
    Ok(out)
}

fn text(t: &Token) -> Result<String, String> {
    if t.quoted {
        String::from_utf8(unescape(&t.value)?).map_err(|e| e.to_string())
    } else {
        Ok(t.value.clone())
    }
}

fn num(t: &Token) -> Result<u64, String> {
    t.value.parse().map_err(|e| format!("{}={}: {e}", t.key.as_deref().unwrap_or(""), t.value))
}

#[derive(Clone)]
struct ConnSpec {
    pid: u32,
    sock: u64,
    role: Role,
    endpoints: Option<Endpoints>,
}

struct Run {
    correlator: Correlator,
    resources: TestResource,
    counters: Arc<Counters>,
    spans: Vec<Span>,
    conn: ConnSpec,
}

impl Run {
    fn new(config: CorrelateConfig) -> Self {
        let counters = Arc::new(Counters::default());
        let mut attributes = Attributes::default();
        attributes.push("service.name", "golden");
        Run {
            correlator: Correlator::new(config, Clock::with_offset(0), counters.clone()),
            resources: TestResource(Arc::new(Resource { service_name: "golden".into(), attributes })),
            counters,
            spans: Vec::new(),
            conn: ConnSpec {
                pid: 100,
                sock: 1,
                role: Role::Server,
                endpoints: Some(Endpoints { local: addr("10.0.0.1:8080"), peer: addr("10.0.0.2:51000") }),
            },
        }
    }

    fn event(&mut self, e: Event) {
        self.correlator.on_event(e, &mut self.resources, &mut self.spans);
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("bad address {s}: {e}"))
}

fn parse_config(tokens: &[Token], config: &mut CorrelateConfig) -> Result<(), String> {
    for t in tokens {
        match t.key.as_deref() {
            Some("max_pending_requests") => config.max_pending_requests = num(t)? as usize,
            Some("max_head_bytes") => config.max_head_bytes = num(t)? as usize,
            Some("max_connections") => config.max_connections = num(t)? as usize,
            Some("idle_timeout_ms") => config.idle_timeout = Duration::from_millis(num(t)?),
            Some("max_unknown_chunks") => config.max_unknown_chunks = num(t)? as u32,
            _ => return Err(format!("unknown config {t:?}")),
        }
    }
    Ok(())
}

fn conn_spec(tokens: &[Token], prev: &ConnSpec) -> Result<ConnSpec, String> {
    let mut spec = prev.clone();
    let mut local = spec.endpoints.map(|e| e.local);
    let mut peer = spec.endpoints.map(|e| e.peer);
    let mut none = false;
    for t in tokens {
        match t.key.as_deref() {
            Some("sock") => spec.sock = num(t)?,
            Some("pid") => spec.pid = num(t)? as u32,
            Some("role") => {
                spec.role = match t.value.as_str() {
                    "server" => Role::Server,
                    "client" => Role::Client,
                    "unknown" => Role::Unknown,
                    other => return Err(format!("unknown role {other}")),
                }
            }
            Some("local") => local = Some(addr(&t.value)),
            Some("peer") => peer = Some(addr(&t.value)),
            Some("endpoints") if t.value == "none" => none = true,
            _ => return Err(format!("unknown conn field {t:?}")),
        }
    }
    spec.endpoints = match (none, local, peer) {
        (false, Some(local), Some(peer)) => Some(Endpoints { local, peer }),
        _ => None,
    };
    Ok(spec)
}

fn data_events(direction: Direction, tokens: &[Token], conn: &ConnSpec) -> Result<Vec<Event>, String> {
    let mut payload = Vec::new();
    let (mut ts, mut len, mut repeat, mut step) = (None, None, 1, 1);
    let mut conn = conn.clone();
    for t in tokens {
        match t.key.as_deref() {
            None if t.quoted => payload.extend(unescape(&t.value)?),
            Some("fill") => payload.extend(std::iter::repeat_n(b'x', num(t)? as usize)),
            Some("ts") => ts = Some(num(t)?),
            Some("len") => len = Some(num(t)?),
            Some("repeat") => repeat = num(t)?,
            Some("step") => step = num(t)?,
            Some("sock") => conn.sock = num(t)?,
            _ => return Err(format!("unknown data field {t:?}")),
        }
    }
    let ts = ts.ok_or("data event without ts")?;
    let total = len.unwrap_or(payload.len() as u64);
    if total < payload.len() as u64 {
        return Err(format!("len={total} is shorter than the {}-byte payload", payload.len()));
    }
    Ok((0..repeat)
        .map(|i| {
            Event::Data(DataEvent {
                origin: Origin { pid: conn.pid, tid: conn.pid, cgroup_id: 1, sock: conn.sock, fd: 3, ts_ns: ts + i * step },
                direction,
                syscall: if direction == Direction::Ingress { Syscall::Recvfrom } else { Syscall::Sendto },
                total_len: u32::try_from(total).unwrap_or(u32::MAX),
                payload: payload.clone(),
                role: conn.role,
                endpoints: conn.endpoints,
                trace: None,
            })
        })
        .collect())
}

/// Compares one span with its expectation; returns the mismatches.
fn check_span(span: &Span, tokens: &[Token]) -> Result<Vec<String>, String> {
    let mut errs = Vec::new();
    let mut expect_eq = |what: &str, got: String, want: String| {
        if got != want {
            errs.push(format!("{what}: got {got:?}, want {want:?}"));
        }
    };
    let attr_str = |k: &str| span.attributes.get(k).map(|v| v.to_string());
    for t in tokens {
        if t.key.is_none()
            && let Some(name) = t.value.strip_prefix("no:")
        {
            expect_eq(name, format!("{:?}", span.attributes.get(name)), "None".into());
            continue;
        }
        let key = t.key.as_deref().ok_or_else(|| format!("bare token {:?} in span", t.value))?;
        let want = text(t)?;
        match key {
            "name" => expect_eq("name", span.name.clone(), want),
            "kind" => expect_eq(
                "kind",
                match span.kind {
                    SpanKind::Server => "server",
                    SpanKind::Client => "client",
                }
                .into(),
                want,
            ),
            "start" => expect_eq("start", span.start_unix_nano.to_string(), want),
            "end" => expect_eq("end", span.end_unix_nano.to_string(), want),
            "status" => expect_eq(
                "status",
                match &span.status {
                    Status::Unset => "unset",
                    Status::Ok => "ok",
                    Status::Error { .. } => "error",
                }
                .into(),
                want,
            ),
            "method" => expect_eq("method", format!("{:?}", attr_str("http.request.method")), format!("{:?}", Some(want))),
            "path" => expect_eq("path", format!("{:?}", attr_str("url.path")), format!("{:?}", Some(want))),
            "code" => {
                let want: i64 = want.parse().map_err(|e| format!("code: {e}"))?;
                expect_eq("code", format!("{:?}", span.attributes.get("http.response.status_code")), format!("{:?}", Some(Value::Int(want))));
            }
            "error" => {
                let got = attr_str("error.type");
                expect_eq("error", format!("{got:?}"), if want == "-" { "None".into() } else { format!("{:?}", Some(want)) });
            }
            "trace_id" => expect_eq("trace_id", hex::encode(span.trace_id), want),
            "parent" => expect_eq("parent", span.parent_span_id.map_or("none".into(), hex::encode), want),
            "flags" => expect_eq("flags", span.flags.to_string(), want),
            "trace_state" => expect_eq("trace_state", span.trace_state.clone(), want),
            k if k.starts_with("attr:") => {
                let name = &k[5..];
                let want = if !t.quoted && let Ok(i) = want.parse::<i64>() { Value::Int(i) } else { Value::from(want) };
                expect_eq(name, format!("{:?}", span.attributes.get(name)), format!("{:?}", Some(want)));
            }
            other => return Err(format!("unknown span field {other}")),
        }
    }
    expect_eq("non-zero ids", (span.span_id != [0; 8] && span.trace_id != [0; 16]).to_string(), "true".into());
    Ok(errs)
}

/// The correlator's losses, under the names the golden files use.
fn stat(c: &Counters, name: &str) -> Result<u64, String> {
    Ok(Counters::get(match name {
        "invalid_traceparent" => &c.traceparent_invalid,
        "requests_dropped" => &c.requests_dropped,
        "orphan_responses" => &c.responses_orphaned,
        "connections_ignored" => &c.connections_ignored,
        other => return Err(format!("unknown stat {other}")),
    }))
}

fn counter(c: &Counters, name: &str) -> Result<u64, String> {
    Ok(Counters::get(match name {
        "parse_failures_http1" => &c.parse_failures_http1,
        "spans_created" => &c.spans_created,
        "connections_evicted" => &c.connections_evicted,
        other => return Err(format!("unknown counter {other}")),
    }))
}

/// Runs one golden file; returns its failures.
fn run_case(path: &Path) -> Result<Vec<String>, String> {
    let source = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let lines: Vec<(usize, Vec<Token>)> = source
        .lines()
        .enumerate()
        .map(|(i, l)| tokenize(l).map(|t| (i + 1, t)).map_err(|e| format!("line {}: {e}", i + 1)))
        .collect::<Result<_, _>>()?;
    let mut config = CorrelateConfig::default();
    for (_, tokens) in lines.iter().filter(|(_, t)| t.first().is_some_and(|t| t.value == "config" && t.key.is_none())) {
        parse_config(&tokens[1..], &mut config)?;
    }
    let mut run = Run::new(config);
    let mut expected_spans = Vec::new();
    let mut failures = Vec::new();
    for (line, tokens) in &lines {
        let Some((head, rest)) = tokens.split_first() else { continue };
        let at = |e: String| format!("line {line}: {e}");
        match head.value.as_str() {
            "config" => {}
            "conn" => run.conn = conn_spec(rest, &run.conn).map_err(at)?,
            "in" | "out" => {
                let dir = if head.value == "in" { Direction::Ingress } else { Direction::Egress };
                for e in data_events(dir, rest, &run.conn).map_err(at)? {
                    run.event(e);
                }
            }
            "close" => {
                let mut origin = Origin { pid: run.conn.pid, tid: run.conn.pid, cgroup_id: 1, sock: run.conn.sock, fd: 3, ts_ns: 0 };
                for t in rest {
                    match t.key.as_deref() {
                        Some("ts") => origin.ts_ns = num(t).map_err(at)?,
                        Some("sock") => origin.sock = num(t).map_err(at)?,
                        _ => return Err(at(format!("unknown close field {t:?}"))),
                    }
                }
                run.event(Event::Close(origin));
            }
            "expire" => {
                let now = rest.iter().find(|t| t.key.as_deref() == Some("now")).ok_or_else(|| at("expire needs now=".into()))?;
                let now = num(now).map_err(at)?;
                run.correlator.expire(now, &mut run.resources, &mut run.spans);
            }
            "span" => expected_spans.push((*line, rest.to_vec())),
            // Checks hold at the point of the file where they appear.
            "counter" | "stats" => {
                for t in rest {
                    let name = t.key.as_deref().ok_or_else(|| at("expected name=value".into()))?;
                    let got = if head.value == "counter" { counter(&run.counters, name) } else { stat(&run.counters, name) }.map_err(at)?;
                    let want = num(t).map_err(at)?;
                    if got != want {
                        failures.push(format!("line {line}: {name} = {got}, want {want}"));
                    }
                }
            }
            "connections" => {
                let want: usize = rest.first().ok_or_else(|| at("connections N".into()))?.value.parse().map_err(|e| at(format!("{e}")))?;
                if run.correlator.connections() != want {
                    failures.push(format!("line {line}: {} connections, want {want}", run.correlator.connections()));
                }
            }
            "forbid" => {
                for t in rest {
                    let needle = text(t).map_err(at)?;
                    for (i, s) in run.spans.iter().enumerate() {
                        if format!("{s:?}").contains(&needle) {
                            failures.push(format!("line {line}: span {i} contains forbidden {needle:?}"));
                        }
                    }
                }
            }
            other => return Err(at(format!("unknown directive {other}"))),
        }
    }

    if run.spans.len() != expected_spans.len() {
        failures.push(format!(
            "{} spans, {} expected; got:\n{}",
            run.spans.len(),
            expected_spans.len(),
            run.spans
                .iter()
                .map(|s| format!("    {} {:?} {}..{} {:?}", s.name, s.kind, s.start_unix_nano, s.end_unix_nano, s.attributes.0))
                .collect::<Vec<_>>()
                .join("\n")
        ));
    }
    for (i, (span, (line, tokens))) in run.spans.iter().zip(&expected_spans).enumerate() {
        for e in check_span(span, tokens).map_err(|e| format!("line {line}: {e}"))? {
            failures.push(format!("span {i} (line {line}): {e}"));
        }
    }
    Ok(failures)
}

fn cases() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/http1");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    files
}

#[test]
fn golden_http1() {
    let files = cases();
    assert!(files.len() >= 20, "only {} golden files found", files.len());
    let mut report = Vec::new();
    for path in &files {
        let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        match run_case(path) {
            Ok(failures) if failures.is_empty() => {}
            Ok(failures) => report.push(format!("{name}:\n  {}", failures.join("\n  "))),
            Err(e) => report.push(format!("{name}: malformed golden file: {e}")),
        }
    }
    assert!(report.is_empty(), "{} of {} golden files failed:\n{}", report.len(), files.len(), report.join("\n"));
}

#[test]
fn tokenizer_and_escapes() {
    let t = tokenize(r#"in ts=5 "a\r\n\x41\"" fill=2 # comment"#).unwrap();
    assert_eq!(t.len(), 4);
    assert_eq!(unescape(&t[2].value).unwrap(), b"a\r\nA\"");
    assert_eq!(t[3].key.as_deref(), Some("fill"));
    assert!(tokenize(r#"in "unterminated"#).is_err());
    assert!(unescape(r"\q").is_err());
}
