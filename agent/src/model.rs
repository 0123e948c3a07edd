//! The span model every stage shares: correlate builds these, export encodes them.

use std::{borrow::Cow, sync::Arc};

/// An attribute key or string value: borrowed when it is a constant (every key tapwire sets,
/// `http`, known methods), so that building a span does not allocate them.
pub type Text = Cow<'static, str>;

/// An attribute value, as in the OTLP `AnyValue` (the subset tapwire emits).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Str(Text),
    Int(i64),
    Double(f64),
    Bool(bool),
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Str(Cow::Owned(v.to_owned()))
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Str(Cow::Owned(v))
    }
}

impl Value {
    /// A constant string value, not copied.
    pub const fn fixed(v: &'static str) -> Value {
        Value::Str(Cow::Borrowed(v))
    }
}
impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Str(s) => f.write_str(s),
            Value::Int(i) => write!(f, "{i}"),
            Value::Double(d) => write!(f, "{d}"),
            Value::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// Key/value pairs in the order they were added (OTLP keeps a list, not a map).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Attributes(pub Vec<(Text, Value)>);

impl Attributes {
    /// Adds `key` (a `&'static str` is not copied) with `value`.
    pub fn push(&mut self, key: impl Into<Text>, value: impl Into<Value>) {
        self.0.push((key.into(), value.into()));
    }
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

/// The resource of one watched service (one OTLP `ResourceSpans` per distinct resource).
#[derive(Clone, Debug, PartialEq)]
pub struct Resource {
    /// `service.name`, also present in `attributes`.
    pub service_name: String,
    pub attributes: Attributes,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    Server,
    Client,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    Unset,
    Ok,
    Error { message: String },
}

/// One finished span, with kernel-derived times already mapped to the wall clock.
#[derive(Clone, Debug)]
pub struct Span {
    pub resource: Arc<Resource>,
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    /// W3C tracestate carried from the incoming request, empty when none.
    pub trace_state: String,
    /// W3C trace flags (bit 0 = sampled).
    pub flags: u8,
    pub name: String,
    pub kind: SpanKind,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    pub attributes: Attributes,
    pub status: Status,
}

impl Span {
    pub fn duration_ns(&self) -> u64 {
        self.end_unix_nano.saturating_sub(self.start_unix_nano)
    }
}
