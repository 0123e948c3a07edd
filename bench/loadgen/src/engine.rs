//! The open-loop engine: one thread, one epoll instance, up to `connections` sockets.
//!
//! Request i is due at t0 + i/rate. Due requests wait in a backlog until a connection is free
//! (keep-alive: the least recently used idle one, so the load spreads over every connection;
//! `close`: a fresh connection, at most `connections` at once). Latency runs from the *due* time
//! to the last byte of the response, so a slow server shows in the percentiles instead of
//! lowering the rate. The loop sleeps in epoll until the next due time (nanosecond timeout,
//! 1 µs timer slack, at least MIN_WAKE_INTERVAL) or until a response arrives.

use std::{
    collections::VecDeque,
    io::{self, ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::fd::{AsRawFd as _, RawFd},
    time::{Duration, Instant},
};

use crate::http::{Head, parse_head};

/// How long after the end of the schedule the engine may still be catching up before it gives
/// up on the requests it has not sent (counted as `unsent`): every run is bounded in time.
pub const CATCH_UP_GRACE: Duration = Duration::from_secs(2);
/// How often requests in flight are checked against the per-request timeout.
const TIMEOUT_SCAN: Duration = Duration::from_millis(10);
/// The loop waits at least this long for the next due request: at high rates requests then go
/// out in small batches (5 at 20k req/s) rather than one wake-up each, which keeps the
/// generator's own CPU use (on the agent's CPU) down. Latency, measured from the due time,
/// includes this batching delay.
const MIN_WAKE_INTERVAL: Duration = Duration::from_micros(250);
/// A response head larger than this is an error.
const MAX_HEAD: usize = 64 * 1024;

pub struct Config {
    pub target: SocketAddr,
    pub request: Vec<u8>,
    pub rate: f64,
    pub duration: Duration,
    pub connections: usize,
    pub close: bool,
    pub timeout: Duration,
}

/// What a run counted. scheduled = completed + errors + unsent.
#[derive(Debug, Default)]
pub struct Tally {
    pub scheduled: u64,
    pub sent: u64,
    pub completed: u64,
    pub non_2xx: u64,
    pub errors: u64,
    pub unsent: u64,
    pub connects: u64,
    /// Requests written more than 1 ms after their due time.
    pub late: u64,
    /// Microseconds from due time to the last response byte, one per completed request.
    pub latencies_us: Vec<u64>,
    /// From t0 (the first due time) to the end of the run.
    pub elapsed: Duration,
}

struct Conn {
    stream: TcpStream,
    /// Due time of the request in flight; None when idle (or when only EOF is awaited).
    due: Option<Instant>,
    sent_at: Instant,
    head_buf: Vec<u8>,
    head: Option<Head>,
    body_left: u64,
    /// The response is complete and the server closes: only EOF is awaited.
    closing: bool,
}

impl Conn {
    fn new(stream: TcpStream) -> Self {
        Conn {
            stream,
            due: None,
            sent_at: Instant::now(),
            head_buf: Vec::new(),
            head: None,
            body_left: 0,
            closing: false,
        }
    }

    fn start(&mut self, due: Instant) {
        self.due = Some(due);
        self.sent_at = Instant::now();
        self.head_buf.clear();
        self.head = None;
        self.body_left = 0;
    }

    /// Takes response bytes; Ok(true) once the response is complete (by its Content-Length).
    fn feed(&mut self, bytes: &[u8]) -> Result<bool, ()> {
        match &self.head {
            None => {
                self.head_buf.extend_from_slice(bytes);
                if let Some(head) = parse_head(&self.head_buf) {
                    let body_have = (self.head_buf.len() - head.head_len) as u64;
                    self.body_left = head.content_length.unwrap_or(0).saturating_sub(body_have);
                    self.head = Some(head);
                } else if self.head_buf.len() > MAX_HEAD {
                    return Err(());
                }
            }
            Some(_) => self.body_left = self.body_left.saturating_sub(bytes.len() as u64),
        }
        Ok(self
            .head
            .as_ref()
            .is_some_and(|h| h.content_length.is_some() && self.body_left == 0))
    }
}

pub fn run(cfg: &Config, t0: Instant) -> io::Result<Tally> {
    set_timer_slack_ns(1_000);
    let epoll = Epoll::new()?;
    let mut t = Tally::default();
    let mut slots: Vec<Option<Conn>> = (0..cfg.connections).map(|_| None).collect();
    let mut free: Vec<usize> = (0..cfg.connections).rev().collect();
    let mut idle: VecDeque<usize> = VecDeque::new();
    let mut backlog: VecDeque<Instant> = VecDeque::new();
    let mut in_flight = 0usize;

    // Keep-alive: every connection exists before the first request, and all of them carry load.
    if !cfg.close {
        while let Some(s) = free.pop() {
            let stream = connect(cfg)?;
            epoll.add(stream.as_raw_fd(), s as u64)?;
            slots[s] = Some(Conn::new(stream));
            t.connects += 1;
            idle.push_back(s);
        }
    }

    let end = t0 + cfg.duration;
    let hard_stop = end + CATCH_UP_GRACE;
    let total = (cfg.duration.as_secs_f64() * cfg.rate).ceil() as u64;
    let due = |i: u64| t0 + Duration::from_secs_f64(i as f64 / cfg.rate);
    t.scheduled = total;
    let mut next_i = 0u64;
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut scratch = vec![0u8; 64 * 1024];
    let mut last_scan = Instant::now();

    let close_slot = |slots: &mut Vec<Option<Conn>>,
                      free: &mut Vec<usize>,
                      idle: &mut VecDeque<usize>,
                      s: usize| {
        if slots[s].take().is_some() {
            idle.retain(|&x| x != s);
            free.push(s);
        }
    };

    loop {
        let now = Instant::now();
        while next_i < total && due(next_i) <= now {
            backlog.push_back(due(next_i));
            next_i += 1;
        }
        if now >= hard_stop {
            t.unsent += backlog.len() as u64 + (total - next_i);
            t.errors += in_flight as u64;
            break;
        }

        // Send every due request a connection is free for.
        while let Some(&d) = backlog.front() {
            let s = if let Some(s) = idle.pop_front() {
                s
            } else if let Some(s) = free.pop() {
                match connect(cfg).and_then(|c| epoll.add(c.as_raw_fd(), s as u64).map(|()| c)) {
                    Ok(stream) => {
                        slots[s] = Some(Conn::new(stream));
                        t.connects += 1;
                        s
                    }
                    Err(_) => {
                        free.push(s);
                        backlog.pop_front();
                        t.errors += 1;
                        continue;
                    }
                }
            } else {
                break;
            };
            backlog.pop_front();
            let conn = slots[s]
                .as_mut()
                .expect("a free or idle slot holds a connection");
            if Instant::now().saturating_duration_since(d) > Duration::from_millis(1) {
                t.late += 1;
            }
            t.sent += 1;
            match conn.stream.write(&cfg.request) {
                Ok(n) if n == cfg.request.len() => {
                    conn.start(d);
                    in_flight += 1;
                }
                _ => {
                    t.errors += 1;
                    close_slot(&mut slots, &mut free, &mut idle, s);
                }
            }
        }
        if next_i >= total && backlog.is_empty() && in_flight == 0 {
            break;
        }

        if last_scan.elapsed() >= TIMEOUT_SCAN {
            last_scan = Instant::now();
            for s in 0..slots.len() {
                let Some(conn) = &slots[s] else { continue };
                if conn.sent_at.elapsed() > cfg.timeout && (conn.due.is_some() || conn.closing) {
                    if conn.due.is_some() {
                        t.errors += 1;
                        in_flight -= 1;
                    }
                    close_slot(&mut slots, &mut free, &mut idle, s);
                }
            }
        }

        let mut wake = if backlog.is_empty() && next_i < total {
            // Not before MIN_WAKE_INTERVAL since the last wake-up: at high rates, requests go
            // out in small batches instead of one wake-up each.
            due(next_i).max(now + MIN_WAKE_INTERVAL)
        } else {
            hard_stop
        };
        if in_flight > 0 {
            wake = wake.min(Instant::now() + TIMEOUT_SCAN);
        }
        let n = epoll.wait(&mut events, wake.saturating_duration_since(Instant::now()))?;
        for ev in &events[..n] {
            let s = ev.u64 as usize;
            while let Some(conn) = slots[s].as_mut() {
                match conn.stream.read(&mut scratch) {
                    Ok(0) => {
                        if let Some(d) = conn.due.take() {
                            in_flight -= 1;
                            // A response without Content-Length ends at EOF.
                            match &conn.head {
                                Some(h) if h.content_length.is_none() => {
                                    record_at(&mut t, h.status, d)
                                }
                                _ => t.errors += 1,
                            }
                        }
                        close_slot(&mut slots, &mut free, &mut idle, s);
                        break;
                    }
                    Ok(n) => {
                        let Some(d) = conn.due else {
                            if !conn.closing {
                                // Bytes nobody asked for: the connection is unusable.
                                close_slot(&mut slots, &mut free, &mut idle, s);
                            }
                            continue;
                        };
                        match conn.feed(&scratch[..n]) {
                            Ok(false) => continue,
                            Ok(true) => {
                                let head = conn.head.as_ref().expect("complete means parsed");
                                record_at(&mut t, head.status, d);
                                in_flight -= 1;
                                conn.due = None;
                                if cfg.close || head.close {
                                    conn.closing = true;
                                    continue; // read on until EOF: the server closes first
                                }
                                idle.push_back(s);
                                break;
                            }
                            Err(()) => {
                                t.errors += 1;
                                in_flight -= 1;
                                close_slot(&mut slots, &mut free, &mut idle, s);
                                break;
                            }
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => {
                        if conn.due.is_some() {
                            t.errors += 1;
                            in_flight -= 1;
                        }
                        close_slot(&mut slots, &mut free, &mut idle, s);
                        break;
                    }
                }
            }
        }
    }
    t.elapsed = t0.elapsed();
    Ok(t)
}

fn record_at(t: &mut Tally, status: u16, due: Instant) {
    t.completed += 1;
    if !(200..300).contains(&status) {
        t.non_2xx += 1;
    }
    t.latencies_us
        .push(due.elapsed().as_micros().min(u64::MAX as u128) as u64);
}

fn connect(cfg: &Config) -> io::Result<TcpStream> {
    // Blocking connect: on loopback it completes at once (or fails at once).
    let stream = TcpStream::connect_timeout(&cfg.target, cfg.timeout)?;
    stream.set_nodelay(true)?;
    stream.set_nonblocking(true)?;
    Ok(stream)
}

/// The smallest timer slack the kernel allows for this thread, so sub-millisecond waits end on
/// time (the default slack is 50 µs).
fn set_timer_slack_ns(ns: libc::c_ulong) {
    // SAFETY: PR_SET_TIMERSLACK takes an integer argument and touches no memory of ours.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, ns, 0, 0, 0) };
}

struct Epoll(RawFd);

impl Epoll {
    fn new() -> io::Result<Self> {
        // SAFETY: plain syscall wrapper; the fd is owned by the returned value.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Epoll(fd))
    }

    /// Level-triggered readability of `fd`, reported with `token`. Closing the fd removes it.
    fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call.
        if unsafe { libc::epoll_ctl(self.0, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout` (nanosecond precision with epoll_pwait2, Linux 5.11+; whole
    /// milliseconds, rounded up, with epoll_wait before that).
    fn wait(&self, events: &mut [libc::epoll_event], timeout: Duration) -> io::Result<usize> {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `events` is a valid writable buffer of `events.len()` entries and `ts` a valid
        // timespec; no signal mask is passed.
        let n = unsafe {
            libc::syscall(
                libc::SYS_epoll_pwait2,
                self.0,
                events.as_mut_ptr(),
                events.len() as libc::c_int,
                &ts as *const libc::timespec,
                std::ptr::null::<libc::sigset_t>(),
                0usize,
            )
        };
        let n = if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
            let ms = timeout.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as libc::c_int;
            // SAFETY: as above.
            let n = unsafe {
                libc::epoll_wait(self.0, events.as_mut_ptr(), events.len() as libc::c_int, ms)
            };
            n as libc::c_long
        } else {
            n
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(err);
        }
        Ok(n as usize)
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.0) };
    }
}
