use rand::{Rng, SeedableRng, rngs::StdRng};

use super::*;
use crate::protocols::http1::{RequestHead, ResponseHead};

fn req_stream() -> Http1Stream {
    Http1Stream::new(MessageKind::Request, StreamConfig::default(), Start::Fresh)
}

fn resp_stream() -> Http1Stream {
    Http1Stream::new(MessageKind::Response, StreamConfig::default(), Start::Fresh)
}

/// Feeds a fully captured chunk.
fn feed(s: &mut Http1Stream, ts: u64, bytes: &[u8]) -> Vec<Http1Event> {
    feed_gap(s, ts, bytes, 0)
}

/// Feeds `bytes` followed by `gap` uncaptured bytes.
fn feed_gap(s: &mut Http1Stream, ts: u64, bytes: &[u8], gap: u64) -> Vec<Http1Event> {
    let mut out = Vec::new();
    s.feed(ts, bytes.len() as u64 + gap, bytes, &NoHints, &mut out);
    out
}

fn request(ev: &Http1Event) -> &RequestHead {
    match ev {
        Http1Event::Head { head, .. } => match head.as_ref() {
            Head::Request(r) => r,
            Head::Response(_) => panic!("response head where a request was expected"),
        },
        other => panic!("expected a head, got {other:?}"),
    }
}

fn response(ev: &Http1Event) -> &ResponseHead {
    match ev {
        Http1Event::Head { head, .. } => match head.as_ref() {
            Head::Response(r) => r,
            Head::Request(_) => panic!("request head where a response was expected"),
        },
        other => panic!("expected a head, got {other:?}"),
    }
}

fn end(end_ts: u64, body_bytes: u64) -> Http1Event {
    Http1Event::End { end_ts, body_bytes, kind: EndKind::Complete }
}

fn truncated_end(end_ts: u64, body_bytes: u64) -> Http1Event {
    Http1Event::End { end_ts, body_bytes, kind: EndKind::Truncated }
}

#[test]
fn request_with_body_in_one_read() {
    let mut s = req_stream();
    let ev = feed(&mut s, 10, b"POST /submit HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello");
    assert_eq!(ev.len(), 2, "{ev:?}");
    assert_eq!(request(&ev[0]).method, "POST");
    assert_eq!(request(&ev[0]).target, "/submit");
    assert_eq!(ev[1], end(10, 5));
}

#[test]
fn head_byte_by_byte_then_body_later() {
    let mut s = req_stream();
    let raw = b"PUT /x HTTP/1.1\r\nContent-Length: 3\r\n\r\n";
    let mut events = Vec::new();
    for (i, b) in raw.iter().enumerate() {
        events.extend(feed(&mut s, 100 + i as u64, std::slice::from_ref(b)));
    }
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(matches!(events[0], Http1Event::Head { start_ts: 100, .. }));
    assert_eq!(request(&events[0]).headers.content_length, Some(3));
    assert!(feed(&mut s, 500, b"ab").is_empty());
    assert_eq!(feed(&mut s, 501, b"c"), vec![end(501, 3)]);
}

#[test]
fn pipelined_requests_in_one_read() {
    let mut s = req_stream();
    let ev = feed(
        &mut s,
        7,
        b"GET /1 HTTP/1.1\r\n\r\nPOST /2 HTTP/1.1\r\nContent-Length: 2\r\n\r\nok\r\nGET /3 HTTP/1.1\r\n\r\n",
    );
    let targets: Vec<&str> = ev
        .iter()
        .filter(|e| matches!(e, Http1Event::Head { .. }))
        .map(|e| request(e).target.as_str())
        .collect();
    assert_eq!(targets, ["/1", "/2", "/3"]);
    let ends: Vec<&Http1Event> = ev.iter().filter(|e| matches!(e, Http1Event::End { .. })).collect();
    assert_eq!(ends, [&end(7, 0), &end(7, 2), &end(7, 0)]);
}

#[test]
fn content_length_body_in_captured_prefixes_and_gaps() {
    let mut s = resp_stream();
    let body: u64 = 1 << 20;
    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {body}\r\n\r\n");
    // First write: head plus the start of the body, 1 KiB captured of 16 KiB.
    let first_total = 16 * 1024u64;
    let mut captured = head.clone().into_bytes();
    captured.resize(1024, b'x');
    let ev = feed_gap(&mut s, 1, &captured, first_total - 1024);
    assert_eq!(ev.len(), 1);
    assert_eq!(response(&ev[0]).status, 200);
    let mut left = body + head.len() as u64 - first_total;
    let mut ts = 2;
    let mut last = Vec::new();
    while left > 0 {
        let total = left.min(16 * 1024);
        last = feed_gap(&mut s, ts, &[b'x'; 1024][..total.min(1024) as usize], total - total.min(1024));
        left -= total;
        ts += 1;
    }
    assert_eq!(last, vec![end(ts - 1, body)]);
}

#[test]
fn chunked_body_with_uncaptured_chunk_data() {
    let mut s = resp_stream();
    let ev = feed(&mut s, 1, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
    assert_eq!(ev.len(), 1);
    // 64 writes of one 16 KiB chunk each: "4000\r\n" + data + "\r\n", 1 KiB captured.
    for i in 0..64u64 {
        let mut captured = b"4000\r\n".to_vec();
        captured.resize(1024, b'y');
        let total = 6 + 16384 + 2;
        assert!(feed_gap(&mut s, 10 + i, &captured, total - 1024).is_empty());
    }
    assert_eq!(feed(&mut s, 99, b"0\r\n\r\n"), vec![end(99, 1 << 20)]);
    // Keep-alive: the next response parses.
    let ev = feed(&mut s, 100, b"HTTP/1.1 204 No Content\r\n\r\n");
    assert_eq!(response(&ev[0]).status, 204);
    assert_eq!(ev[1], end(100, 0));
}

#[test]
fn chunked_with_trailers_and_extensions() {
    let mut s = resp_stream();
    let ev = feed(
        &mut s,
        5,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\nA \r\n0123456789\r\n0\r\nX-Sum: 1\r\n\r\n",
    );
    assert_eq!(ev[1], end(5, 13));
}

#[test]
fn chunk_size_line_in_a_gap_loses_framing_until_the_next_message() {
    let mut s = resp_stream();
    feed(&mut s, 1, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
    // The chunk ends inside the captured prefix; the next size line is in the gap.
    let mut captured = b"10\r\n0123456789abcdef\r\n".to_vec();
    captured.resize(1024, b'z');
    assert!(feed_gap(&mut s, 2, &captured[..22], 3000).is_empty());
    assert!(s.is_open_ended());
    assert!(feed_gap(&mut s, 3, b"zzzz", 1000).is_empty(), "still lost");
    // A write that starts with a response ends the lost one at its last byte.
    let ev = feed(&mut s, 9, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(ev[0], truncated_end(3, 16 + 3000 + 1004));
    assert_eq!(response(&ev[1]).status, 200);
    assert_eq!(ev[2], end(9, 0));
}

#[test]
fn end_open_ended_then_resync() {
    let mut s = resp_stream();
    feed(&mut s, 1, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
    feed_gap(&mut s, 2, b"", 5000);
    assert!(s.is_open_ended());
    let mut out = Vec::new();
    s.end_open_ended(&mut out);
    assert_eq!(out, vec![truncated_end(2, 5000)]);
    assert!(feed(&mut s, 3, b"garbage").is_empty(), "seeking a message start");
    assert_eq!(response(&feed(&mut s, 4, b"HTTP/1.1 304 Not Modified\r\n\r\n")[0]).status, 304);
}

#[test]
fn responses_without_body() {
    let mut s = resp_stream();
    let hints = |k: usize| if k == 0 { RequestHint::Head } else { RequestHint::Normal };
    let mut out = Vec::new();
    let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\nHTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n\
        HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi";
    s.feed(3, raw.len() as u64, raw, &hints, &mut out);
    let summary: Vec<String> = out
        .iter()
        .map(|e| match e {
            Http1Event::Head { .. } => format!("head {}", response(e).status),
            Http1Event::End { body_bytes, .. } => format!("end {body_bytes}"),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(summary, ["head 200", "end 0", "head 204", "end 0", "head 304", "end 0", "head 200", "end 2"]);
}

#[test]
fn interim_responses_do_not_consume_hints() {
    let mut s = resp_stream();
    let hints = |k: usize| if k == 0 { RequestHint::Head } else { RequestHint::Normal };
    let mut out = Vec::new();
    let raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n";
    s.feed(3, raw.len() as u64, raw, &hints, &mut out);
    assert_eq!(out.len(), 6, "{out:?}");
    assert_eq!(response(&out[4]).status, 200);
    assert_eq!(out[5], end(3, 0), "the final response answers HEAD: no body");
}

#[test]
fn read_until_close() {
    let mut s = resp_stream();
    let ev = feed(&mut s, 1, b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\nsome");
    assert_eq!(ev.len(), 1);
    assert!(s.is_open_ended());
    feed_gap(&mut s, 2, b"more", 100);
    let mut out = Vec::new();
    s.finish(&mut out);
    assert_eq!(out, vec![end(2, 108)]);
    assert!(s.is_done());
}

#[test]
fn finish_mid_body_is_truncated_and_partial_heads_are_failures() {
    let mut s = resp_stream();
    feed(&mut s, 1, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc");
    let mut out = Vec::new();
    s.finish(&mut out);
    assert_eq!(out, vec![truncated_end(1, 3)]);

    let mut s = req_stream();
    feed(&mut s, 1, b"GET / HTTP/1.1\r\nHost:");
    let mut out = Vec::new();
    s.finish(&mut out);
    assert_eq!(out, vec![Http1Event::Error(ParseError::UnfinishedHead)]);
    assert_eq!(s.buffered_bytes(), 0);

    // Between messages nothing is lost.
    let mut s = req_stream();
    feed(&mut s, 1, b"GET / HTTP/1.1\r\n\r\n\r\n");
    let mut out = Vec::new();
    s.finish(&mut out);
    assert_eq!(out, vec![]);
}

#[test]
fn switching_protocols_stops_parsing() {
    let mut s = resp_stream();
    let ev = feed(&mut s, 4, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello");
    assert_eq!(response(&ev[0]).status, 101);
    assert_eq!(ev[1..], [end(4, 0), Http1Event::Upgraded]);
    assert!(s.is_done());
    assert!(feed(&mut s, 5, b"HTTP/1.1 200 OK\r\n\r\n").is_empty());

    let mut s = resp_stream();
    let hints = |_k: usize| RequestHint::Connect;
    let mut out = Vec::new();
    s.feed(1, 19, b"HTTP/1.1 200 OK\r\n\r\n", &hints, &mut out);
    assert_eq!(out[1..], [end(1, 0), Http1Event::Upgraded]);
}

#[test]
fn oversized_head_fails_and_resynchronises() {
    let mut s = Http1Stream::new(MessageKind::Request, StreamConfig { max_head_bytes: 64, max_failures: 8 }, Start::Fresh);
    let mut ev = feed(&mut s, 1, b"GET /");
    ev.extend(feed(&mut s, 2, &[b'a'; 100]));
    assert_eq!(ev, vec![Http1Event::Error(ParseError::HeadTooLong { limit: 64 })]);
    assert!(s.buffered_bytes() <= 64 + MAX_CHUNK_LINE);
    assert!(feed(&mut s, 3, b"aaa HTTP/1.1\r\n\r\n").is_empty(), "the rest of the long head is skipped");
    let ev = feed(&mut s, 4, b"GET /ok HTTP/1.1\r\n\r\n");
    assert_eq!(request(&ev[0]).target, "/ok");
}

#[test]
fn head_cut_by_a_gap_is_parsed_as_far_as_it_goes() {
    let mut s = req_stream();
    let mut captured = b"GET /big HTTP/1.1\r\nHost: example.com\r\nUser-Agent: ua\r\nCookie: ".to_vec();
    captured.resize(1024, b'c');
    let ev = feed_gap(&mut s, 5, &captured, 2048);
    assert_eq!(ev.len(), 1);
    let r = request(&ev[0]);
    assert!(r.truncated);
    assert_eq!(r.headers.host.as_deref(), Some("example.com"));
    assert_eq!(r.headers.count, 2);
    assert!(s.is_open_ended());
    let ev = feed(&mut s, 6, b"GET /next HTTP/1.1\r\n\r\n");
    assert_eq!(ev[0], truncated_end(5, 0));
    assert_eq!(request(&ev[1]).target, "/next");
}

#[test]
fn message_starting_in_a_gap_is_reported_uncaptured() {
    let mut s = resp_stream();
    let first = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    let ev = feed_gap(&mut s, 5, first, 3000);
    assert_eq!(ev[1..], [end(5, 2), Http1Event::Uncaptured { start_ts: 5 }]);
    let ev = feed(&mut s, 6, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(ev[0], truncated_end(5, 0));
}

#[test]
fn fresh_stream_that_is_not_http() {
    let mut s = req_stream();
    assert_eq!(feed(&mut s, 1, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"), vec![Http1Event::NotHttp]);
    assert!(s.is_done());
    assert!(feed(&mut s, 2, b"GET / HTTP/1.1\r\n\r\n").is_empty());
    // A byte-by-byte start is not judged before it can be.
    let mut s = req_stream();
    assert!(feed(&mut s, 1, b"P").is_empty());
    assert!(feed(&mut s, 2, b"O").is_empty());
    assert_eq!(feed(&mut s, 3, b"X"), vec![Http1Event::NotHttp]);
}

#[test]
fn mid_stream_start_waits_for_a_message_start() {
    let mut s = Http1Stream::new(MessageKind::Request, StreamConfig::default(), Start::MidStream);
    assert!(feed(&mut s, 1, b"dy bytes of an earlier request\r\n\r\nGET /x HTTP/1.1\r\n\r\n").is_empty());
    let ev = feed(&mut s, 2, b"GET /y HTTP/1.1\r\n\r\n");
    assert_eq!(request(&ev[0]).target, "/y");
}

#[test]
fn unknown_methods_are_accepted_after_the_first_message() {
    let mut s = req_stream();
    feed(&mut s, 1, b"GET / HTTP/1.1\r\n\r\n");
    let ev = feed(&mut s, 2, b"PROPFIND /dav HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(request(&ev[0]).method, "PROPFIND");
}

#[test]
fn request_with_non_chunked_transfer_encoding_is_rejected() {
    let mut s = req_stream();
    let ev = feed(&mut s, 1, b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\nxx");
    assert_eq!(ev, vec![Http1Event::Error(ParseError::RequestTransferEncoding)]);
}

#[test]
fn gives_up_after_repeated_failures() {
    let mut s = Http1Stream::new(MessageKind::Request, StreamConfig { max_head_bytes: 1024, max_failures: 2 }, Start::Fresh);
    let mut events = Vec::new();
    for ts in 0..5 {
        events.extend(feed(&mut s, ts, b"GET / HTTP/1.1\r\nBad Header\x00: x\r\n\r\n"));
    }
    let errors = events.iter().filter(|e| matches!(e, Http1Event::Error(_))).count();
    assert_eq!(errors, 3);
    assert_eq!(events.last(), Some(&Http1Event::GaveUp));
    assert!(s.is_done());
}

#[test]
fn chunk_lines_parse() {
    assert_eq!(parse_chunk_line(b"1a\r\n"), Some(26));
    assert_eq!(parse_chunk_line(b"FF;name=value\r\n"), Some(255));
    assert_eq!(parse_chunk_line(b"0 ; x\n"), Some(0));
    assert_eq!(parse_chunk_line(b"\r\n"), None);
    assert_eq!(parse_chunk_line(b"zz\r\n"), None);
    assert_eq!(parse_chunk_line(b"1 2\r\n"), None);
    assert_eq!(parse_chunk_line(b"1234567890abcdef\r\n"), None);
    assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n\r\nbody", 0), Some(18));
    assert_eq!(find_head_end(b"GET / HTTP/1.1\n\nbody", 0), Some(16));
    assert_eq!(find_head_end(b"GET / HTTP/1.1\r\nHost: a\r\n", 0), None);
}

/// Random chunks, gaps and finishes: nothing panics and buffers stay bounded.
#[test]
fn fuzz_random_chunks() {
    let mut rng = StdRng::seed_from_u64(0x7a9_0001);
    let pieces: [&[u8]; 12] = [
        b"GET / HTTP/1.1\r\n",
        b"HTTP/1.1 200 OK\r\n",
        b"Content-Length: 5\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"\r\n",
        b"5\r\nhello\r\n0\r\n\r\n",
        b"ffffffffffff\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"POST /x?y=1 HTTP/1.0\r\n",
        b"Host: a:1\r\n",
        b"\x00\xff\x16garbage",
        b"Content-Length: 99999999999\r\n",
    ];
    let config = StreamConfig { max_head_bytes: 512, max_failures: 16 };
    for round in 0..200 {
        let kind = if round % 2 == 0 { MessageKind::Request } else { MessageKind::Response };
        let start = if round % 3 == 0 { Start::MidStream } else { Start::Fresh };
        let mut s = Http1Stream::new(kind, config.clone(), start);
        let mut out = Vec::new();
        for ts in 0..40u64 {
            let mut chunk = Vec::new();
            for _ in 0..rng.random_range(0..6) {
                if rng.random_bool(0.8) {
                    chunk.extend_from_slice(pieces[rng.random_range(0..pieces.len())]);
                } else {
                    let n = rng.random_range(0..64);
                    chunk.extend((0..n).map(|_| rng.random::<u8>()));
                }
            }
            let cut = rng.random_range(0..=chunk.len());
            let gap = if rng.random_bool(0.2) { rng.random_range(0..5000) } else { 0 };
            let hint = match rng.random_range(0..3) {
                0 => RequestHint::Normal,
                1 => RequestHint::Head,
                _ => RequestHint::Connect,
            };
            let hints = move |_k: usize| hint;
            s.feed(ts, cut as u64 + gap, &chunk[..cut], &hints, &mut out);
            assert!(s.buffered_bytes() <= KEEP_BUFFER.max(512) + MAX_CHUNK_LINE);
            if rng.random_bool(0.02) {
                s.end_open_ended(&mut out);
            }
        }
        s.finish(&mut out);
        // Ends never outnumber starts.
        let starts = out.iter().filter(|e| matches!(e, Http1Event::Head { .. } | Http1Event::Uncaptured { .. })).count();
        let ends = out.iter().filter(|e| matches!(e, Http1Event::End { .. })).count();
        assert!(ends <= starts, "round {round}: {ends} ends for {starts} starts");
    }
}
