//! One direction of an HTTP/1 connection: heads, body framing (Content-Length, chunked,
//! read-until-close), gaps of uncaptured bytes, resynchronisation after garbage.

use super::{
    Sniff,
    head::{self, Head, HeadError},
    plausible_request, sniff_request, sniff_response,
};

/// Longest chunk-size line (with extensions) followed; longer lines lose the framing.
const MAX_CHUNK_LINE: usize = 1024;
/// A head buffer that grew larger than this is freed once the head is parsed.
const KEEP_BUFFER: usize = 4096;

/// Which kind of message this direction carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageKind {
    /// Requests: the process reads them if it is the server, writes them if it is the client.
    Request,
    /// Responses.
    Response,
}

/// Limits of one stream.
#[derive(Clone, Debug)]
pub struct StreamConfig {
    /// Largest incomplete head buffered; beyond it the head is a parse failure.
    pub max_head_bytes: usize,
    /// Consecutive parse failures after which the stream gives up for good.
    pub max_failures: u32,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig { max_head_bytes: 16 * 1024, max_failures: 8 }
    }
}

/// Where a stream starts relative to the conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// At the start of the connection: the first bytes decide whether it speaks HTTP/1 at all
    /// (if not, the stream reports [`Http1Event::NotHttp`] and stops).
    Fresh,
    /// Somewhere in the middle: bytes are skipped until a read or write starts with a message.
    MidStream,
}

/// What the request a response answers implies for the response's framing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RequestHint {
    /// Any other method: the response's headers decide its framing.
    #[default]
    Normal,
    /// A HEAD request: the response has no body whatever its headers say.
    Head,
    /// A CONNECT request: a 2xx response turns the connection into a tunnel.
    Connect,
}

/// Tells a response stream about the requests its responses answer, in order.
pub trait RequestHints {
    /// The hint for the `k`-th response (0 = the next) not yet reported by this stream.
    fn hint(&self, k: usize) -> RequestHint;
}

/// For request streams, and response streams whose requests are unknown.
pub struct NoHints;

impl RequestHints for NoHints {
    fn hint(&self, _k: usize) -> RequestHint {
        RequestHint::Normal
    }
}

impl<F: Fn(usize) -> RequestHint> RequestHints for F {
    fn hint(&self, k: usize) -> RequestHint {
        self(k)
    }
}

/// How a message ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndKind {
    /// Its framing said so (or, for a read-until-close body, the stream ended).
    Complete,
    /// Its end was not seen: the framing was lost or the stream ended early. The end time is the
    /// last byte seen.
    Truncated,
}

/// What a stream reports.
#[derive(Clone, Debug, PartialEq)]
pub enum Http1Event {
    /// A message head; `start_ts` is the time of the read/write that carried its first byte.
    Head { head: Box<Head>, start_ts: u64 },
    /// A message started here but its head was not captured; its end will be reported.
    Uncaptured { start_ts: u64 },
    /// The current message ended; `end_ts` is the time of the read/write carrying its last byte.
    /// `body_bytes` counts body bytes (chunk data for chunked bodies; raw bytes once the
    /// framing is lost).
    End { end_ts: u64, body_bytes: u64, kind: EndKind },
    /// The connection switched protocols (101, or a tunnel after CONNECT): no more HTTP/1.
    Upgraded,
    /// A message could not be parsed; the stream resynchronises on the next message start.
    Error(ParseError),
    /// The first bytes of a [`Start::Fresh`] stream are not HTTP/1. The stream stops.
    NotHttp,
    /// Too many consecutive parse failures. The stream stops.
    GaveUp,
}

/// Why a message could not be followed.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    /// The head did not parse.
    #[error("invalid message head")]
    Head(#[from] HeadError),
    /// No end of head within `max_head_bytes`.
    #[error("message head longer than {limit} bytes")]
    HeadTooLong { limit: usize },
    /// A message should start here but the bytes are no method (or no "HTTP/1.").
    #[error("bytes where a message should start do not look like HTTP/1")]
    BadStart,
    /// A request's framing cannot be known (RFC 9112 section 6.3).
    #[error("Transfer-Encoding without chunked in a request")]
    RequestTransferEncoding,
    /// Not a hexadecimal chunk size, or a line too long.
    #[error("invalid chunk-size line")]
    ChunkSize,
    /// Chunk data longer than its size said.
    #[error("chunk data not followed by CRLF")]
    ChunkCrlf,
    /// The stream ended (close, idle expiry, eviction) inside a message head.
    #[error("the connection ended inside a message head")]
    UnfinishedHead,
    /// Trailers longer than `max_head_bytes`.
    #[error("trailer section longer than {limit} bytes")]
    TrailersTooLong { limit: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Between messages.
    Idle,
    /// Collecting a head (in `head_buf` unless it arrives whole).
    Head,
    Body { remaining: u64 },
    ChunkSize,
    ChunkData { remaining: u64 },
    ChunkCrlf { seen_cr: bool },
    /// `line_len`: bytes of the current trailer line other than CR; `total`: trailer bytes so far.
    Trailers { line_len: usize, total: usize },
    /// Body delimited by the end of the connection.
    UntilClose,
    /// In a message whose framing is lost: its bytes count until a read/write starts with a new
    /// message or the owner ends it.
    Lost,
    /// Between messages, position unknown: skip until a read/write starts with a message.
    Seek,
    /// After a protocol switch.
    Passthrough,
    /// Not HTTP, or given up.
    Dead,
}

/// The message being followed after its head.
#[derive(Clone, Copy, Debug)]
struct Progress {
    last_ts: u64,
    body_bytes: u64,
}

/// One direction of one HTTP/1 connection. Memory is bounded by `max_head_bytes` plus a chunk
/// line; every input is accepted without panicking.
#[derive(Debug)]
pub struct Http1Stream {
    kind: MessageKind,
    config: StreamConfig,
    state: State,
    head_buf: Vec<u8>,
    head_start_ts: u64,
    /// The current head's first bytes passed the start check.
    prefix_ok: bool,
    line: Vec<u8>,
    msg: Option<Progress>,
    /// No message seen yet on a `Start::Fresh` stream.
    fresh: bool,
    failures: u32,
    /// Final responses reported during the current `feed` (the `k` of [`RequestHints::hint`]).
    finals: usize,
}

impl Http1Stream {
    /// A stream of `kind` messages, starting at the beginning of the connection or in its middle.
    pub fn new(kind: MessageKind, config: StreamConfig, start: Start) -> Self {
        Http1Stream {
            kind,
            config,
            state: if start == Start::Fresh { State::Idle } else { State::Seek },
            head_buf: Vec::new(),
            head_start_ts: 0,
            prefix_ok: false,
            line: Vec::new(),
            msg: None,
            fresh: start == Start::Fresh,
            failures: 0,
            finals: 0,
        }
    }

    /// Which kind of message this stream carries.
    pub fn kind(&self) -> MessageKind {
        self.kind
    }

    /// True once the stream stopped (not HTTP, gave up, or switched protocols).
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Dead | State::Passthrough)
    }

    /// True while inside a message whose end only the connection can tell (framing lost, or a
    /// body read until close).
    pub fn is_open_ended(&self) -> bool {
        matches!(self.state, State::Lost | State::UntilClose)
    }

    /// Bytes held in buffers (bounded by `max_head_bytes` plus a chunk line, and by
    /// [`KEEP_BUFFER`] between messages).
    pub fn buffered_bytes(&self) -> usize {
        self.head_buf.capacity() + self.line.capacity()
    }

    /// Feeds one read or write: `total_len` bytes moved at `ts_ns`, of which `captured` is the
    /// prefix the kernel copied. Events go to `out`.
    pub fn feed(&mut self, ts_ns: u64, total_len: u64, captured: &[u8], hints: &dyn RequestHints, out: &mut Vec<Http1Event>) {
        if total_len == 0 || self.is_done() {
            return;
        }
        let captured = &captured[..captured.len().min(usize::try_from(total_len).unwrap_or(usize::MAX))];
        let gap = total_len - captured.len() as u64;
        self.finals = 0;
        if matches!(self.state, State::Seek | State::Lost) && self.starts_message(captured) {
            if self.state == State::Lost {
                self.end_message(None, EndKind::Truncated, out);
            }
            self.state = State::Idle;
        }
        let mut data = captured;
        while !data.is_empty() {
            let n = self.step(ts_ns, data, hints, out);
            data = &data[n.min(data.len())..];
            if self.is_done() {
                return;
            }
        }
        if gap > 0 {
            self.skip(ts_ns, gap, hints, out);
        }
        if let Some(m) = self.msg.as_mut() {
            m.last_ts = ts_ns;
        }
    }

    /// The stream ended (close or expiry): reports the end of a message in progress. A body read
    /// until close ends `Complete`; anything else cut short ends `Truncated`. A partial head is
    /// a parse failure ([`ParseError::UnfinishedHead`]).
    pub fn finish(&mut self, out: &mut Vec<Http1Event>) {
        match self.state {
            State::Head if !self.head_buf.is_empty() => out.push(Http1Event::Error(ParseError::UnfinishedHead)),
            State::UntilClose => self.end_message(None, EndKind::Complete, out),
            State::Body { .. }
            | State::ChunkSize
            | State::ChunkData { .. }
            | State::ChunkCrlf { .. }
            | State::Trailers { .. }
            | State::Lost => self.end_message(None, EndKind::Truncated, out),
            _ => {}
        }
        self.state = State::Dead;
        self.release();
    }

    /// Ends an open-ended message (see [`Self::is_open_ended`]) now, at its last byte seen;
    /// the stream then waits for a read/write that starts with a new message.
    pub fn end_open_ended(&mut self, out: &mut Vec<Http1Event>) {
        if self.is_open_ended() {
            self.end_message(None, EndKind::Truncated, out);
            self.state = State::Seek;
        }
    }

    /// Stops parsing for good (the owner saw the connection switch protocols).
    pub fn passthrough(&mut self) {
        self.state = State::Passthrough;
        self.msg = None;
        self.release();
    }

    fn release(&mut self) {
        self.head_buf = Vec::new();
        self.line = Vec::new();
    }

    fn starts_message(&self, data: &[u8]) -> bool {
        match self.kind {
            MessageKind::Request => sniff_request(data) == Sniff::Yes,
            MessageKind::Response => sniff_response(data) == Sniff::Yes,
        }
    }

    /// Consumes a prefix of `data` (possibly none when only the state changes).
    fn step(&mut self, ts: u64, data: &[u8], hints: &dyn RequestHints, out: &mut Vec<Http1Event>) -> usize {
        match self.state {
            State::Idle => {
                let blank = data.iter().take_while(|&&b| b == b'\r' || b == b'\n').count();
                if blank == 0 {
                    self.state = State::Head;
                    self.head_start_ts = ts;
                    self.head_buf.clear();
                    self.prefix_ok = false;
                }
                blank
            }
            State::Head => self.step_head(ts, data, hints, out),
            State::Body { remaining } => {
                let n = take(remaining, data.len());
                self.add_body(n);
                if n == remaining {
                    self.end_message(Some(ts), EndKind::Complete, out);
                } else {
                    self.state = State::Body { remaining: remaining - n };
                }
                n as usize
            }
            State::ChunkSize => self.step_chunk_line(data, out),
            State::ChunkData { remaining } => {
                let n = take(remaining, data.len());
                self.add_body(n);
                self.state = if n == remaining {
                    State::ChunkCrlf { seen_cr: false }
                } else {
                    State::ChunkData { remaining: remaining - n }
                };
                n as usize
            }
            State::ChunkCrlf { seen_cr } => match data[0] {
                b'\r' if !seen_cr => {
                    self.state = State::ChunkCrlf { seen_cr: true };
                    1
                }
                b'\n' => {
                    self.state = State::ChunkSize;
                    1
                }
                _ => {
                    self.lose_framing(Some(ParseError::ChunkCrlf), out);
                    0
                }
            },
            State::Trailers { line_len, total } => {
                let limit = self.config.max_head_bytes;
                let (n, newline) = match data.iter().position(|&b| b == b'\n') {
                    Some(p) => (p + 1, true),
                    None => (data.len(), false),
                };
                let line_len = line_len + data[..n].iter().filter(|&&b| b != b'\r' && b != b'\n').count();
                let total = total + n;
                if newline && line_len == 0 {
                    self.end_message(Some(ts), EndKind::Complete, out);
                } else if total > limit {
                    self.lose_framing(Some(ParseError::TrailersTooLong { limit }), out);
                } else {
                    self.state = State::Trailers { line_len: if newline { 0 } else { line_len }, total };
                }
                n
            }
            State::UntilClose | State::Lost => {
                self.add_body(data.len() as u64);
                data.len()
            }
            State::Seek | State::Passthrough | State::Dead => data.len(),
        }
    }

    fn step_head(&mut self, ts: u64, data: &[u8], hints: &dyn RequestHints, out: &mut Vec<Http1Event>) -> usize {
        if !self.prefix_ok {
            let mut prefix = [0u8; 32];
            let a = self.head_buf.len().min(prefix.len());
            prefix[..a].copy_from_slice(&self.head_buf[..a]);
            let b = data.len().min(prefix.len() - a);
            prefix[a..a + b].copy_from_slice(&data[..b]);
            match self.check_start(&prefix[..a + b]) {
                Sniff::Yes => {
                    self.prefix_ok = true;
                    self.fresh = false;
                }
                Sniff::NeedMore => {}
                Sniff::No => {
                    self.head_buf.clear();
                    if self.fresh {
                        out.push(Http1Event::NotHttp);
                        self.state = State::Dead;
                        self.release();
                    } else {
                        self.fail(ParseError::BadStart, out);
                    }
                    return data.len();
                }
            }
        }
        if self.head_buf.is_empty()
            && let Some(end) = find_head_end(data, 0)
        {
            self.complete_head(ts, &data[..end], hints, out);
            return end;
        }
        let old = self.head_buf.len();
        let room = self.config.max_head_bytes.saturating_sub(old);
        let take = data.len().min(room);
        self.head_buf.extend_from_slice(&data[..take]);
        if let Some(end) = find_head_end(&self.head_buf, old.saturating_sub(3)) {
            let mut buf = std::mem::take(&mut self.head_buf);
            self.complete_head(ts, &buf[..end], hints, out);
            buf.clear();
            if buf.capacity() <= KEEP_BUFFER {
                self.head_buf = buf;
            }
            return end.saturating_sub(old);
        }
        if self.head_buf.len() >= self.config.max_head_bytes {
            self.head_buf = Vec::new();
            self.fail(ParseError::HeadTooLong { limit: self.config.max_head_bytes }, out);
            return data.len();
        }
        take
    }

    fn check_start(&self, prefix: &[u8]) -> Sniff {
        match self.kind {
            MessageKind::Request if self.fresh => sniff_request(prefix),
            MessageKind::Request => plausible_request(prefix),
            MessageKind::Response => sniff_response(prefix),
        }
    }

    /// A whole head is in `bytes`: parse it, report it, and set up the body framing.
    fn complete_head(&mut self, ts: u64, bytes: &[u8], hints: &dyn RequestHints, out: &mut Vec<Http1Event>) {
        let parsed = match self.kind {
            MessageKind::Request => head::parse_request(bytes).map(|(h, _)| Head::Request(h)),
            MessageKind::Response => head::parse_response(bytes).map(|(h, _)| Head::Response(h)),
        };
        match parsed {
            Ok(head) => self.start_message(ts, head, hints, out),
            Err(e) => self.fail(ParseError::Head(e), out),
        }
    }

    fn start_message(&mut self, ts: u64, head: Head, hints: &dyn RequestHints, out: &mut Vec<Http1Event>) {
        let truncated = match &head {
            Head::Request(r) => r.truncated,
            Head::Response(r) => r.truncated,
        };
        let next = match &head {
            Head::Request(r) => {
                if r.headers.is_chunked() {
                    State::ChunkSize
                } else if r.headers.transfer_encoding.is_some() {
                    // RFC 9112 6.3: the server must reject it; its framing is unknowable.
                    self.fail(ParseError::RequestTransferEncoding, out);
                    return;
                } else {
                    match r.headers.content_length {
                        Some(n) if n > 0 => State::Body { remaining: n },
                        _ => State::Idle,
                    }
                }
            }
            Head::Response(r) => {
                let status = r.status;
                let interim = (100..200).contains(&status) && status != 101;
                let hint = if interim {
                    RequestHint::Normal
                } else {
                    self.finals += 1;
                    hints.hint(self.finals - 1)
                };
                if status == 101 || (hint == RequestHint::Connect && (200..300).contains(&status)) {
                    State::Passthrough
                } else if interim || hint == RequestHint::Head || status == 204 || status == 304 {
                    State::Idle
                } else if r.headers.is_chunked() {
                    State::ChunkSize
                } else if r.headers.transfer_encoding.is_some() {
                    State::UntilClose
                } else {
                    match r.headers.content_length {
                        Some(0) => State::Idle,
                        Some(n) => State::Body { remaining: n },
                        None => State::UntilClose,
                    }
                }
            }
        };
        out.push(Http1Event::Head { head: Box::new(head), start_ts: self.head_start_ts });
        self.msg = Some(Progress { last_ts: ts, body_bytes: 0 });
        self.failures = 0;
        self.fresh = false;
        if truncated {
            // The rest of the head, and so the framing, was not captured.
            self.state = State::Lost;
            return;
        }
        match next {
            State::Idle => self.end_message(Some(ts), EndKind::Complete, out),
            State::Passthrough => {
                self.end_message(Some(ts), EndKind::Complete, out);
                out.push(Http1Event::Upgraded);
                self.passthrough();
            }
            other => self.state = other,
        }
    }

    fn step_chunk_line(&mut self, data: &[u8], out: &mut Vec<Http1Event>) -> usize {
        let (n, complete) = match data.iter().position(|&b| b == b'\n') {
            Some(p) => (p + 1, true),
            None => (data.len(), false),
        };
        if self.line.len() + n > MAX_CHUNK_LINE {
            self.lose_framing(Some(ParseError::ChunkSize), out);
            return n;
        }
        self.line.extend_from_slice(&data[..n]);
        if complete {
            let size = parse_chunk_line(&self.line);
            self.line.clear();
            match size {
                Some(0) => self.state = State::Trailers { line_len: 0, total: 0 },
                Some(size) => self.state = State::ChunkData { remaining: size },
                None => self.lose_framing(Some(ParseError::ChunkSize), out),
            }
        }
        n
    }

    /// `gap` bytes moved without being captured.
    fn skip(&mut self, ts: u64, mut gap: u64, hints: &dyn RequestHints, out: &mut Vec<Http1Event>) {
        while gap > 0 {
            match self.state {
                State::Idle => {
                    // A message starts in bytes we did not see.
                    if self.kind == MessageKind::Response {
                        self.finals += 1;
                    }
                    out.push(Http1Event::Uncaptured { start_ts: ts });
                    self.msg = Some(Progress { last_ts: ts, body_bytes: 0 });
                    self.state = State::Lost;
                    return;
                }
                State::Head => {
                    let buf = std::mem::take(&mut self.head_buf);
                    match head::parse_truncated(&buf, self.kind == MessageKind::Request) {
                        Ok(head) if self.prefix_ok => self.start_message(ts, head, hints, out),
                        _ if self.fresh && !self.prefix_ok => {
                            out.push(Http1Event::NotHttp);
                            self.state = State::Dead;
                            self.release();
                            return;
                        }
                        _ => {
                            if self.kind == MessageKind::Response {
                                self.finals += 1;
                            }
                            out.push(Http1Event::Uncaptured { start_ts: self.head_start_ts });
                            self.msg = Some(Progress { last_ts: ts, body_bytes: 0 });
                            self.state = State::Lost;
                        }
                    }
                    if buf.capacity() <= KEEP_BUFFER {
                        self.head_buf = buf;
                        self.head_buf.clear();
                    }
                    // Where the head ended in the gap is unknown: count none of the rest.
                    return;
                }
                State::Body { remaining } => {
                    let n = remaining.min(gap);
                    self.add_body(n);
                    gap -= n;
                    if n == remaining {
                        self.end_message(Some(ts), EndKind::Complete, out);
                    } else {
                        self.state = State::Body { remaining: remaining - n };
                    }
                }
                State::ChunkData { remaining } => {
                    let n = remaining.min(gap);
                    self.add_body(n);
                    gap -= n;
                    self.state = if n == remaining {
                        State::ChunkCrlf { seen_cr: false }
                    } else {
                        State::ChunkData { remaining: remaining - n }
                    };
                }
                State::ChunkCrlf { seen_cr } => {
                    // Assume the uncaptured bytes are the CRLF the framing expects.
                    let need = if seen_cr { 1 } else { 2 };
                    if gap >= need {
                        gap -= need;
                        self.state = State::ChunkSize;
                    } else {
                        gap = 0;
                        self.state = State::ChunkCrlf { seen_cr: true };
                    }
                }
                State::ChunkSize | State::Trailers { .. } => {
                    // A chunk-size line (or the trailers) fell into the gap.
                    self.line.clear();
                    self.lose_framing(None, out);
                }
                State::UntilClose | State::Lost => {
                    self.add_body(gap);
                    gap = 0;
                }
                State::Seek | State::Passthrough | State::Dead => gap = 0,
            }
        }
    }

    fn add_body(&mut self, n: u64) {
        if let Some(m) = self.msg.as_mut() {
            m.body_bytes = m.body_bytes.saturating_add(n);
        }
    }

    /// Reports the end of the current message (`ts` None: at its last byte seen) and returns to
    /// `Idle`.
    fn end_message(&mut self, ts: Option<u64>, kind: EndKind, out: &mut Vec<Http1Event>) {
        if let Some(m) = self.msg.take() {
            out.push(Http1Event::End { end_ts: ts.unwrap_or(m.last_ts), body_bytes: m.body_bytes, kind });
        }
        self.state = State::Idle;
    }

    /// The framing of the message in progress cannot be followed any more.
    fn lose_framing(&mut self, error: Option<ParseError>, out: &mut Vec<Http1Event>) {
        if let Some(e) = error {
            out.push(Http1Event::Error(e));
        }
        self.line.clear();
        self.state = State::Lost;
    }

    /// A message failed to parse: report, then seek the next message start or give up.
    fn fail(&mut self, error: ParseError, out: &mut Vec<Http1Event>) {
        out.push(Http1Event::Error(error));
        self.msg = None;
        self.head_buf.clear();
        self.failures += 1;
        if self.failures > self.config.max_failures {
            out.push(Http1Event::GaveUp);
            self.state = State::Dead;
            self.release();
        } else {
            self.state = State::Seek;
        }
    }
}

fn take(remaining: u64, available: usize) -> u64 {
    remaining.min(available as u64)
}

/// Index just past the empty line that ends a head (CRLF CRLF, or bare LFs), searching from `from`.
fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < buf.len() {
        let nl = i + buf[i..].iter().position(|&b| b == b'\n')?;
        match buf.get(nl + 1) {
            Some(b'\n') => return Some(nl + 2),
            Some(b'\r') if buf.get(nl + 2) == Some(&b'\n') => return Some(nl + 3),
            _ => i = nl + 1,
        }
    }
    None
}

/// A chunk-size line "1a;ext=v\r\n" -> 26. Hex digits (at most 15), optional whitespace and
/// extensions, CRLF or LF.
fn parse_chunk_line(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\n")?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return None;
    }
    let rest = line[digits..].trim_ascii_start();
    if !rest.is_empty() && rest[0] != b';' {
        return None;
    }
    let hex = std::str::from_utf8(&line[..digits]).ok()?;
    u64::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests;
