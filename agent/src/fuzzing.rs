//! Entry points of the cargo-fuzz targets (`agent/fuzz`) for the parsers that see untrusted
//! input: captured traffic (HTTP/1 heads, `traceparent`, paths for `http.route`) and the /proc
//! and cgroup files of the watched processes, which those processes control (their environment,
//! command line and `comm`, and cgroup names when a cgroup is delegated to them).
//!
//! Each function takes arbitrary bytes, must never panic, and checks what must hold of the
//! result. Built for the fuzz targets (`--cfg fuzzing`) and for the unit tests, which replay the
//! regression inputs under `agent/fuzz/regressions/`.

use rand::{SeedableRng, rngs::SmallRng};

use crate::{
    capture::event::{KernelTrace, ParentSource, Role},
    correlate::{route, trace},
    discover::{container, resource, select::process as select_process},
    metrics::{process, queue},
    protocols::http1,
};

/// HTTP/1 head parsing: complete heads, truncated heads, and the cheap sniffers.
pub fn http1_head(data: &[u8]) {
    if let Ok((head, n)) = http1::parse_request(data) {
        assert!(n <= data.len() && n > 0);
        assert!(!head.method.is_empty());
    }
    if let Ok((_, n)) = http1::parse_response(data) {
        assert!(n <= data.len() && n > 0);
    }
    for request in [true, false] {
        if let Ok(head) = http1::parse_truncated(data, request) {
            assert_eq!(matches!(head, http1::Head::Request(_)), request);
        }
    }
    let _ = (http1::sniff(data), http1::sniff_request(data), http1::sniff_response(data), http1::plausible_request(data));
}

/// `traceparent` and `tracestate`: input is `traceparent \n tracestate`. A valid
/// `traceparent` round-trips, and a span joins its trace.
pub fn traceparent(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (tp, ts) = text.split_once('\n').unwrap_or((&text, ""));
    let parsed = trace::parse_traceparent(tp);
    if let Some(p) = parsed {
        let again = format!("00-{}-{}-{:02x}", hex::encode(p.trace_id), hex::encode(p.span_id), p.flags);
        assert_eq!(again, tp.trim_matches([' ', '\t']), "a valid traceparent round-trips");
    }
    let mut rng = SmallRng::seed_from_u64(1);
    let (ids, invalid) = trace::span_ids(Some(tp), Some(ts), &mut rng);
    assert_eq!(invalid, parsed.is_none());
    assert_ne!(ids.trace_id, [0; 16]);
    assert_ne!(ids.span_id, [0; 8]);
    if let Some(p) = parsed {
        assert_eq!((ids.trace_id, ids.parent_span_id), (p.trace_id, Some(p.span_id)));
    }
    for (side, source) in [(Role::Server, ParentSource::Header), (Role::Client, ParentSource::AppHeader)] {
        let k = KernelTrace { side, trace_id: [1; 16], span_id: [2; 8], parent_span_id: None, source, flags: 1, injected: false };
        let (ids, invalid) = trace::kernel_span_ids(&k, Some(tp), Some(ts), None);
        assert_eq!(invalid, parsed.is_none());
        assert_eq!(ids.span_id, [2; 8], "without a server request in flight the kernel's span id wins");
    }
}

/// Route templating: input is `pattern,pattern,...\n path \n path ...`. Configured patterns
/// that parse are tried first; a path never becomes a route that still holds an identifier
/// the heuristic would replace, and the table stays within its per-service cap.
pub fn route(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let patterns: Vec<route::Pattern> =
        lines.next().unwrap_or_default().split(',').filter_map(|p| route::Pattern::parse(p).ok()).collect();
    const CAP: usize = 8;
    let mut table = route::RouteTable::new(patterns, CAP);
    let mut routes = std::collections::HashSet::new();
    for path in lines {
        let templated = route::templatize(path);
        assert!(templated.split('/').all(|seg| seg == route::ID_PLACEHOLDER || !route::looks_like_id(seg)));
        let (r, source) = table.route("svc", path);
        if source != route::RouteSource::Overflow {
            routes.insert(r);
        }
        assert!(routes.len() <= CAP, "more distinct routes than the cap");
    }
}

/// The /proc and cgroup file parsers. Byte 0 picks the file; the rest is its content.
pub fn proc_files(data: &[u8]) {
    let Some((&which, content)) = data.split_first() else { return };
    let text = String::from_utf8_lossy(content);
    match which % 10 {
        0 => {
            if let Some(name) = resource::service_name_from_environ(content) {
                assert!(!name.is_empty() && name.trim() == name);
            }
        }
        1 => {
            for (k, v) in resource::own_resource_attributes(content) {
                assert!(!k.is_empty() && !v.is_empty());
            }
        }
        2 => {
            let (environ, cmdline) = split_at_marker(content);
            let _ = select_process::otlp_exporter_reason(environ, cmdline);
        }
        3 => {
            if let Some(stat) = process::parse_stat(&text) {
                assert!(text.contains(stat.comm.as_str()));
            }
        }
        4 => {
            let _ = process::parse_status(&text);
            let _ = process::parse_cpu_stat(&text);
        }
        5 => {
            let (v2, v1) = process::parse_proc_cgroup(&text);
            for path in [v2, v1].into_iter().flatten() {
                assert!(text.contains(path.as_str()));
            }
        }
        6 => {
            if let Some(id) = container::container_id(&text) {
                assert_eq!(id.len(), 64);
            }
            if let Some(uid) = container::pod_uid(&text) {
                assert_eq!(uid.len(), 36);
            }
        }
        7 => {
            let _ = select_process::parse_listen_sockets(&text);
            let _ = queue::parse_listen_rows(&text);
        }
        8 => {
            let _ = process::parse_v1_memory_mount(&text);
        }
        _ => {
            let _ = crate::config::parse_resource_attributes(&text);
        }
    }
}

/// Splits at the first `\xff\xff` (environ | cmdline).
fn split_at_marker(data: &[u8]) -> (&[u8], &[u8]) {
    match data.windows(2).position(|w| w == [0xff, 0xff]) {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (data, &[]),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// Every input under agent/fuzz/regressions/<target>/ (crashes the fuzzers found, kept as
    /// tests after the fix) and a few seeds run through their entry point.
    #[test]
    fn regression_inputs_and_seeds_pass() {
        type Entry = fn(&[u8]);
        let targets: [(&str, Entry); 4] =
            [("http1_head", http1_head), ("traceparent", traceparent), ("route", route), ("proc_files", proc_files)];
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
        for (name, run) in targets {
            if let Ok(entries) = std::fs::read_dir(dir.join(name)) {
                for entry in entries.flatten() {
                    run(&std::fs::read(entry.path()).unwrap());
                }
            }
        }
        http1_head(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n");
        http1_head(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\nk=v");
        traceparent(b"00-00000000000000000000000000000000-00f067aa0ba902b7-01");
        route(b"/users/{id},/static/*\n/users/7\n/static/a/b\n/items/123\n/x/\xff");
        proc_files(b"\x03123 (a) b) c) S 1 1 1 0 -1 0 0 0 0 0 5 6 0 0 20 0 1 0 99 4096 1");
        proc_files(b"\x050::/kubepods/pod0a1b2c3d-0000-1111-2222-333344445555/abc\n4:memory:/m\n");
    }
}
