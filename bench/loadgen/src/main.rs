//! tapwire-loadgen: an open-loop HTTP/1.1 load generator for `cargo xtask bench`.
//!
//! wrk sends the next request as soon as the previous response arrived (closed loop), so it can
//! only saturate. The agent-cost figures need *fixed* request rates, and wrk2 is not packaged for
//! Debian: this is the small honest substitute, built the way wrk2 is. Requests are sent on a
//! fixed schedule, request i at t0 + i/RATE, whether or not earlier responses were quick, over
//! CONNECTIONS connections driven by one epoll loop (engine.rs). Latency is measured from each
//! request's *scheduled* time, so a stalled server shows up in the percentiles instead of
//! silently lowering the rate (no coordinated omission).
//!
//!     tapwire-loadgen --addr 127.0.0.1:8080 --path /f.bin --rate 10000 --duration 10 \
//!         [--connections 16] [--close] [--timeout-ms 2000]
//!
//! `--close` sends `Connection: close` on a new connection for every request (connection churn,
//! at most CONNECTIONS at once); the client reads to EOF, so the server closes first and keeps
//! the TIME_WAIT.
//!
//! Prints one JSON object on stdout (see `summary_json`). Exits 0 even when requests failed (the
//! caller reads `errors` and `unsent`); 2 on bad arguments, 1 when the run could not start.

mod engine;
mod http;

use std::{
    net::ToSocketAddrs as _,
    process::ExitCode,
    time::{Duration, Instant},
};

use engine::{Config, Tally};

const USAGE: &str = "usage: tapwire-loadgen --addr HOST:PORT --path PATH --rate REQ_PER_S \
                     --duration SECONDS [--connections N] [--close] [--timeout-ms MS]";

#[derive(Debug, Clone, PartialEq)]
struct Options {
    addr: String,
    path: String,
    rate: f64,
    duration: Duration,
    connections: usize,
    close: bool,
    timeout: Duration,
}

fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut addr = None;
    let mut path = None;
    let mut rate = None;
    let mut duration = None;
    let mut connections = 16usize;
    let mut close = false;
    let mut timeout = Duration::from_secs(2);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match arg.as_str() {
            "--addr" => addr = Some(value("--addr")?),
            "--path" => path = Some(value("--path")?),
            "--rate" => {
                let v: f64 = value("--rate")?
                    .parse()
                    .map_err(|e| format!("--rate: {e}"))?;
                if !(v.is_finite() && v > 0.0) {
                    return Err("--rate must be a positive number".into());
                }
                rate = Some(v);
            }
            "--duration" => {
                let v: f64 = value("--duration")?
                    .parse()
                    .map_err(|e| format!("--duration: {e}"))?;
                if !(v.is_finite() && v > 0.0 && v <= 3600.0) {
                    return Err("--duration must be in (0, 3600] seconds".into());
                }
                duration = Some(Duration::from_secs_f64(v));
            }
            "--connections" => {
                connections = value("--connections")?
                    .parse()
                    .map_err(|e| format!("--connections: {e}"))?;
                if !(1..=1024).contains(&connections) {
                    return Err("--connections must be in 1..=1024".into());
                }
            }
            "--close" => close = true,
            "--timeout-ms" => {
                let ms: u64 = value("--timeout-ms")?
                    .parse()
                    .map_err(|e| format!("--timeout-ms: {e}"))?;
                timeout = Duration::from_millis(ms.max(1));
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    let path = path.ok_or("--path is required")?;
    if !path.starts_with('/') {
        return Err("--path must start with /".into());
    }
    Ok(Options {
        addr: addr.ok_or("--addr is required")?,
        path,
        rate: rate.ok_or("--rate is required")?,
        duration: duration.ok_or("--duration is required")?,
        connections,
        close,
        timeout,
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match parse_args(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("tapwire-loadgen: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let Some(target) = opts.addr.to_socket_addrs().ok().and_then(|mut a| a.next()) else {
        eprintln!("tapwire-loadgen: cannot resolve {}", opts.addr);
        return ExitCode::from(2);
    };
    let cfg = Config {
        target,
        request: http::request(&opts.addr, &opts.path, opts.close),
        rate: opts.rate,
        duration: opts.duration,
        connections: opts.connections,
        close: opts.close,
        timeout: opts.timeout,
    };
    // The schedule starts a little after the keep-alive connections are opened.
    let t0 = Instant::now() + Duration::from_millis(50);
    match engine::run(&cfg, t0) {
        Ok(mut tally) => {
            println!("{}", summary_json(&opts, &mut tally));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tapwire-loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The nearest-rank percentile of sorted values (0 when empty).
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summary_json(opts: &Options, t: &mut Tally) -> String {
    t.latencies_us.sort_unstable();
    let l = &t.latencies_us;
    let secs = opts.duration.as_secs_f64();
    format!(
        concat!(
            "{{\"mode\":\"{}\",\"target_rps\":{},\"duration_s\":{},\"connections\":{},",
            "\"scheduled\":{},\"sent\":{},\"completed\":{},\"non_2xx\":{},\"errors\":{},",
            "\"unsent\":{},\"late\":{},\"connects\":{},\"elapsed_s\":{:.3},\"achieved_rps\":{:.1},",
            "\"latency_us\":{{\"p50\":{},\"p90\":{},\"p99\":{},\"p999\":{},\"max\":{}}}}}"
        ),
        if opts.close { "close" } else { "keepalive" },
        opts.rate,
        secs,
        opts.connections,
        t.scheduled,
        t.sent,
        t.completed,
        t.non_2xx,
        t.errors,
        t.unsent,
        t.late,
        t.connects,
        t.elapsed.as_secs_f64(),
        // Over the schedule's length, or longer when the workers had to catch up.
        t.completed as f64 / secs.max(t.elapsed.as_secs_f64()),
        percentile(l, 50.0),
        percentile(l, 90.0),
        percentile(l, 99.0),
        percentile(l, 99.9),
        l.last().copied().unwrap_or(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn parses_arguments() {
        let o = parse_args(&args(
            "--addr 127.0.0.1:80 --path /f --rate 1000 --duration 2.5 --close --connections 4",
        ))
        .unwrap();
        assert_eq!(o.rate, 1000.0);
        assert_eq!(o.duration, Duration::from_millis(2500));
        assert!(o.close);
        assert_eq!(o.connections, 4);
        assert!(parse_args(&args("--addr a:1 --path f --rate 1 --duration 1")).is_err());
        assert!(parse_args(&args("--addr a:1 --path /f --rate 0 --duration 1")).is_err());
        assert!(parse_args(&args("--addr a:1 --path /f --rate 1")).is_err());
        assert!(parse_args(&args("--bogus")).is_err());
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&[7], 99.9), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }
}
