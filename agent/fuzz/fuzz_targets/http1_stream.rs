//! The HTTP/1 stream assembler on arbitrary chunks, including uncaptured gaps.
//! Input: byte 0 picks the stream kind and start; then records of
//! [captured length, gap length, captured bytes...].
#![no_main]

use libfuzzer_sys::fuzz_target;
use tapwire::protocols::http1::{Http1Stream, MessageKind, NoHints, Start, StreamConfig};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else { return };
    let kind = if mode & 1 == 0 { MessageKind::Request } else { MessageKind::Response };
    let start = if mode & 2 == 0 { Start::Fresh } else { Start::MidStream };
    let config = StreamConfig { max_head_bytes: 512, max_failures: 4 };
    let mut stream = Http1Stream::new(kind, config, start);
    let mut out = Vec::new();
    let mut ts = 0u64;
    while rest.len() >= 2 {
        let n = usize::from(rest[0]).min(rest.len() - 2);
        let gap = u64::from(rest[1]) * 97;
        let chunk = &rest[2..2 + n];
        ts += 1;
        stream.feed(ts, n as u64 + gap, chunk, &NoHints, &mut out);
        // Buffers are bounded by the head cap and the chunk-line cap (1 KiB), with Vec growth
        // (up to 2x), and a parsed head's buffer is only kept when it is at most 4 KiB.
        assert!(stream.buffered_bytes() <= 2 * (512 + 1024) + 4096, "buffers above their cap: {}", stream.buffered_bytes());
        out.clear();
        rest = &rest[2 + n..];
    }
    stream.finish(&mut out);
});
