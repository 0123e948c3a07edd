//! Accept-queue backlog of the watched services' listening TCP sockets: connections fully
//! established by the kernel and waiting for the service to `accept()` them. A growing backlog
//! means the service is not keeping up; at the limit, the kernel drops new handshakes.
//!
//! Which sockets: the socket inodes each process holds (/proc/PID/fd -> `socket:[INODE]`),
//! matched with the listening TCP sockets of its network namespace. Those come from a sock_diag
//! netlink dump filtered to LISTEN, made inside the process's namespace: it gives the backlog
//! (`sk_ack_backlog`) and the configured maximum (`sk_max_ack_backlog`, `ss -lnt`'s Send-Q), and
//! its cost follows the number of listeners, not of connections. When the dump is not possible
//! (no CAP_SYS_ADMIN to enter another namespace) the LISTEN rows (state 0A) of
//! /proc/PID/net/tcp and tcp6 give the backlog (`rx_queue`); they do not carry the maximum
//! (`tx_queue` of a listener is always 0), so the limit is then left out.
//!
//! A socket shared by several processes (pre-fork workers) is counted once, for the lowest pid
//! holding it. A process's fd table is read again only every [`FD_RESCAN`] (a busy server holds
//! thousands of fds), so a listener opened meanwhile shows up within that delay.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use super::{
    model::{Data, ResourceMetrics, Snapshot},
    process::{WatchedProcess, int, metric, point},
};
use crate::model::{Attributes, Resource};

/// TCP_LISTEN in the kernel's state numbering (`0A` in /proc/net/tcp).
const TCP_LISTEN: u8 = 10;

/// How long the listening sockets found in a process's fd table are trusted before the table is
/// read again.
pub const FD_RESCAN: Duration = Duration::from_secs(30);

/// Lists the listening TCP sockets of the network namespace of a pid, given the procfs root.
type ListenReader = fn(&Path, u32) -> io::Result<Vec<ListenSocket>>;

/// Collects `tapwire.listen.backlog` and `tapwire.listen.backlog.limit`.
pub struct ListenQueues {
    proc_root: PathBuf,
    read_listeners: ListenReader,
    /// Per pid: when its fd table was read and the listening sockets found there.
    fds: HashMap<u32, FdScan>,
    /// Whether a sock_diag failure was already logged (once is enough).
    logged_diag_error: bool,
}

struct FdScan {
    at_unix_nano: u64,
    listening: Vec<u64>,
}

/// One listening TCP socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ListenSocket {
    local: SocketAddr,
    /// Connections waiting for accept().
    backlog: u32,
    /// The most the kernel queues; `None` when read from /proc/net/tcp.
    limit: Option<u32>,
    inode: u64,
}

impl ListenQueues {
    /// Reads the real /proc, listeners through sock_diag.
    pub fn new() -> Self {
        ListenQueues { proc_root: PathBuf::from("/proc"), read_listeners: diag::listeners, fds: HashMap::new(), logged_diag_error: false }
    }

    /// Reads another procfs root (fixtures); listeners still through sock_diag unless replaced.
    pub fn with_proc_root(proc_root: PathBuf) -> Self {
        ListenQueues { proc_root, ..Self::new() }
    }

    /// Reads the listening sockets of `procs` now. Call it on each metrics tick with the latest
    /// scan. Output: one [`ResourceMetrics`] per resource that has a listening socket, with one
    /// point per local port (sockets of a resource on the same port, e.g. IPv4 and IPv6, add up).
    pub fn collect(&mut self, procs: &[WatchedProcess], now_unix_nano: u64) -> Snapshot {
        let mut sorted: Vec<&WatchedProcess> = procs.iter().collect();
        sorted.sort_by_key(|p| p.pid);
        sorted.dedup_by_key(|p| p.pid);
        let pids: HashSet<u32> = sorted.iter().map(|p| p.pid).collect();
        self.fds.retain(|pid, _| pids.contains(pid));
        let rescan_ns = u64::try_from(FD_RESCAN.as_nanos()).unwrap_or(u64::MAX);

        // Candidate socket inodes per process (fresh = read from the fd table just now), and one
        // representative pid per network namespace.
        let mut owners: Vec<(&WatchedProcess, Vec<u64>, bool)> = Vec::new();
        let mut namespaces: BTreeMap<String, u32> = BTreeMap::new();
        for p in sorted {
            let dir = self.proc_root.join(p.pid.to_string());
            let cached = self.fds.get(&p.pid).filter(|s| now_unix_nano.wrapping_sub(s.at_unix_nano) < rescan_ns);
            let (inodes, fresh) = match cached {
                Some(scan) => (scan.listening.clone(), false),
                None => (socket_inodes(&dir.join("fd")), true),
            };
            if inodes.is_empty() {
                if fresh {
                    self.fds.insert(p.pid, FdScan { at_unix_nano: now_unix_nano, listening: Vec::new() });
                }
                continue;
            }
            // Unknown namespace: read that process's own view.
            let ns = fs::read_link(dir.join("ns/net")).map_or_else(|_| format!("pid:{}", p.pid), |l| l.display().to_string());
            namespaces.entry(ns).or_insert(p.pid);
            owners.push((p, inodes, fresh));
        }
        if owners.is_empty() {
            return Vec::new();
        }
        let wanted: HashSet<u64> = owners.iter().flat_map(|(_, i, _)| i.iter().copied()).collect();
        let mut sockets: HashMap<u64, ListenSocket> = HashMap::new();
        for &pid in namespaces.values() {
            let found = match (self.read_listeners)(&self.proc_root, pid) {
                Ok(found) => found,
                Err(error) => {
                    if !self.logged_diag_error {
                        tracing::warn!(pid, %error, "cannot list listening sockets through sock_diag; reading /proc/PID/net/tcp instead, without tapwire.listen.backlog.limit");
                        self.logged_diag_error = true;
                    }
                    proc_listeners(&self.proc_root.join(pid.to_string()).join("net"))
                }
            };
            sockets.extend(found.into_iter().filter(|s| wanted.contains(&s.inode)).map(|s| (s.inode, s)));
        }
        for (p, inodes, fresh) in &owners {
            if *fresh {
                let listening = inodes.iter().copied().filter(|i| sockets.contains_key(i)).collect();
                self.fds.insert(p.pid, FdScan { at_unix_nano: now_unix_nano, listening });
            }
        }
        let owners: Vec<(&Arc<Resource>, &[u64])> = owners.iter().map(|(p, i, _)| (&p.resource, i.as_slice())).collect();
        assemble(&owners, &sockets, now_unix_nano)
    }
}

impl Default for ListenQueues {
    fn default() -> Self {
        Self::new()
    }
}

/// The LISTEN rows of /proc/PID/net/tcp and tcp6 (no limits there).
fn proc_listeners(net_dir: &Path) -> Vec<ListenSocket> {
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|f| fs::read_to_string(net_dir.join(f)).ok())
        .flat_map(|text| parse_listen_rows(&text))
        .collect()
}

/// Builds the metrics from the socket inodes of each process (in pid order) and the listening
/// sockets. Each inode counts once, for the first process holding it.
fn assemble(owners: &[(&Arc<Resource>, &[u64])], sockets: &HashMap<u64, ListenSocket>, now: u64) -> Snapshot {
    #[derive(Default)]
    struct Port {
        backlog: u64,
        limit: Option<u64>,
        limit_unknown: bool,
    }
    let mut claimed: HashSet<u64> = HashSet::new();
    let mut groups: Vec<(Arc<Resource>, BTreeMap<u16, Port>)> = Vec::new();
    let mut group_of: HashMap<*const Resource, usize> = HashMap::new();
    for (resource, inodes) in owners {
        for inode in *inodes {
            let Some(sock) = sockets.get(inode) else { continue };
            if !claimed.insert(*inode) {
                continue;
            }
            let idx = *group_of.entry(Arc::as_ptr(resource)).or_insert_with(|| {
                groups.push(((*resource).clone(), BTreeMap::new()));
                groups.len() - 1
            });
            let port = groups[idx].1.entry(sock.local.port()).or_default();
            port.backlog += u64::from(sock.backlog);
            match sock.limit {
                Some(l) => port.limit = Some(port.limit.unwrap_or(0) + u64::from(l)),
                None => port.limit_unknown = true,
            }
        }
    }
    groups
        .into_iter()
        .map(|(resource, ports)| {
            let attrs = |port: u16| {
                let mut a = Attributes::default();
                a.push("server.port", i64::from(port));
                a
            };
            let backlog = ports.iter().map(|(p, q)| point(attrs(*p), 0, now, int(q.backlog))).collect();
            let mut metrics = vec![metric(
                "tapwire.listen.backlog",
                "Connections fully established and waiting for the service to accept() them (accept queue length of its listening sockets)",
                "{connection}",
                Data::Gauge { points: backlog },
            )];
            let limit: Vec<_> = ports
                .iter()
                .filter(|(_, q)| !q.limit_unknown)
                .filter_map(|(p, q)| Some(point(attrs(*p), 0, now, int(q.limit?))))
                .collect();
            if !limit.is_empty() {
                metrics.push(metric(
                    "tapwire.listen.backlog.limit",
                    "Most connections fully established and waiting for the service to accept() them that the kernel queues (the listen() backlog, capped by net.core.somaxconn); beyond it new handshakes are dropped",
                    "{connection}",
                    Data::Gauge { points: limit },
                ));
            }
            ResourceMetrics { resource, metrics }
        })
        .collect()
}

/// Inodes of the sockets a process holds (`socket:[INODE]` links in its fd directory), sorted.
/// Empty when the directory cannot be read (the process exited, or no permission).
fn socket_inodes(fd_dir: &Path) -> Vec<u64> {
    let Ok(entries) = fs::read_dir(fd_dir) else { return Vec::new() };
    let mut out: Vec<u64> = entries
        .flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter_map(|target| parse_socket_link(target.to_str()?))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// `socket:[12345]` -> 12345.
fn parse_socket_link(target: &str) -> Option<u64> {
    target.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// The LISTEN rows of /proc/net/tcp or tcp6 text; other rows and malformed lines are skipped.
pub(crate) fn parse_listen_rows(text: &str) -> Vec<ListenSocket> {
    text.lines().filter_map(parse_row).filter(|(_, state, _)| *state == TCP_LISTEN).map(|(row, _, _)| row).collect()
}

/// One row: (local address, backlog = rx_queue, inode), state, tx_queue.
fn parse_row(line: &str) -> Option<(ListenSocket, u8, u32)> {
    // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode ...
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() < 10 || !f[0].ends_with(':') {
        return None;
    }
    let local = parse_addr(f[1])?;
    let state = u8::from_str_radix(f[3], 16).ok()?;
    let (tx, rx) = f[4].split_once(':')?;
    let tx = u32::from_str_radix(tx, 16).ok()?;
    let backlog = u32::from_str_radix(rx, 16).ok()?;
    let inode = f[9].parse().ok()?;
    Some((ListenSocket { local, backlog, limit: None, inode }, state, tx))
}

/// `0100007F:1F40` or a 32-digit IPv6 form. The kernel prints each 32-bit word of the address
/// in host byte order; the port is plain hex.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> { Some(u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok()?.to_ne_bytes()) };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// sock_diag (NETLINK_SOCK_DIAG) dump of the listening TCP sockets of a network namespace.
mod diag {
    use std::{
        fs::File,
        io,
        net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
        os::fd::{AsRawFd, FromRawFd, OwnedFd},
        path::Path,
    };

    use super::ListenSocket;

    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const NLMSG_HDRLEN: usize = 16;
    /// struct inet_diag_req_v2.
    const REQ_LEN: usize = 56;
    /// struct inet_diag_msg: family, state, timer, retrans, id (48 bytes), expires, rqueue,
    /// wqueue, uid, inode.
    const MSG_LEN: usize = 72;
    const MSG_FAMILY: usize = 0;
    const MSG_STATE: usize = 1;
    /// inet_diag_sockid: sport (big endian) at 4, src address at 8 (16 bytes).
    const MSG_SPORT: usize = 4;
    const MSG_SRC: usize = 8;
    const MSG_RQUEUE: usize = 56;
    const MSG_WQUEUE: usize = 60;
    const MSG_INODE: usize = 68;

    /// The listening TCP sockets in the network namespace of `pid`, with backlog and limit.
    /// Enters that namespace on a short-lived thread when it is not the agent's own (needs
    /// CAP_SYS_ADMIN); the netlink socket stays bound to the namespace it was created in.
    pub(super) fn listeners(proc_root: &Path, pid: u32) -> io::Result<Vec<ListenSocket>> {
        let target = proc_root.join(pid.to_string()).join("ns/net");
        let ours = std::fs::read_link("/proc/self/ns/net")?;
        let sock = if std::fs::read_link(&target)? == ours { open()? } else { open_in(&target)? };
        let mut out = Vec::new();
        for (seq, family) in [(1, libc::AF_INET), (2, libc::AF_INET6)] {
            dump(&sock, family as u8, seq, &mut out)?;
        }
        Ok(out)
    }

    fn open() -> io::Result<OwnedFd> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, libc::NETLINK_SOCK_DIAG) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // Never hang the metrics tick: give up after a second without an answer.
        let tv = libc::timeval { tv_sec: 1, tv_usec: 0 };
        // SAFETY: tv outlives the call and its size is passed.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    }

    fn open_in(netns: &Path) -> io::Result<OwnedFd> {
        let ns = File::open(netns)?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns changes the namespace of this thread only, which ends right after.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                open()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the sock_diag thread panicked")))
        })
    }

    /// An `inet_diag_req_v2` dump request for listening TCP sockets of one family.
    pub(super) fn request(family: u8, seq: u32) -> [u8; NLMSG_HDRLEN + REQ_LEN] {
        let mut b = [0u8; NLMSG_HDRLEN + REQ_LEN];
        b[0..4].copy_from_slice(&((NLMSG_HDRLEN + REQ_LEN) as u32).to_ne_bytes());
        b[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        b[6..8].copy_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
        b[8..12].copy_from_slice(&seq.to_ne_bytes());
        // pid 0: the kernel. Then the request: family, protocol, ext, pad, states bitmask.
        b[16] = family;
        b[17] = libc::IPPROTO_TCP as u8;
        b[20..24].copy_from_slice(&(1u32 << super::TCP_LISTEN).to_ne_bytes());
        b
    }

    fn dump(sock: &OwnedFd, family: u8, seq: u32, out: &mut Vec<ListenSocket>) -> io::Result<()> {
        let req = request(family, seq);
        // SAFETY: req is a valid buffer of the given length. An unconnected netlink socket sends
        // to its default peer, the kernel (port id 0).
        let sent = unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            // SAFETY: buf is writable for its whole length.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if parse(&buf[..n as usize], seq, out)? {
                return Ok(());
            }
        }
    }

    /// Parses one datagram of netlink messages into `out`; `Ok(true)` once the dump is done.
    pub(super) fn parse(buf: &[u8], seq: u32, out: &mut Vec<ListenSocket>) -> io::Result<bool> {
        let u32_at = |b: &[u8], i: usize| b.get(i..i + 4).map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]));
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed sock_diag message");
        let mut off = 0;
        if buf.is_empty() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "sock_diag socket closed"));
        }
        while off + NLMSG_HDRLEN <= buf.len() {
            let len = u32_at(buf, off).ok_or_else(bad)? as usize;
            if len < NLMSG_HDRLEN || off + len > buf.len() {
                return Err(bad());
            }
            let kind = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
            let msg_seq = u32_at(buf, off + 8).ok_or_else(bad)?;
            let body = &buf[off + NLMSG_HDRLEN..off + len];
            off += (len + 3) & !3;
            if msg_seq != seq {
                continue;
            }
            match kind {
                NLMSG_DONE => return Ok(true),
                NLMSG_ERROR => {
                    let code = u32_at(body, 0).ok_or_else(bad)? as i32;
                    if code != 0 {
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                }
                SOCK_DIAG_BY_FAMILY if body.len() >= MSG_LEN && body[MSG_STATE] == super::TCP_LISTEN => {
                    let (Some(backlog), Some(limit), Some(inode)) = (u32_at(body, MSG_RQUEUE), u32_at(body, MSG_WQUEUE), u32_at(body, MSG_INODE))
                    else {
                        return Err(bad());
                    };
                    let src = &body[MSG_SRC..MSG_SRC + 16];
                    let ip = match i32::from(body[MSG_FAMILY]) {
                        libc::AF_INET => IpAddr::V4(Ipv4Addr::new(src[0], src[1], src[2], src[3])),
                        libc::AF_INET6 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(src).map_err(|_| bad())?)),
                        _ => continue,
                    };
                    let port = u16::from_be_bytes([body[MSG_SPORT], body[MSG_SPORT + 1]]);
                    out.push(ListenSocket { local: SocketAddr::new(ip, port), backlog, limit: Some(limit), inode: u64::from(inode) });
                }
                _ => {}
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{TcpListener, TcpStream},
        os::fd::{FromRawFd, OwnedFd},
        time::{Duration, Instant},
    };

    use super::*;
    use crate::metrics::{
        model::Number,
        process::tests::{find, points, res, testdata, value},
    };

    /// sock_diag stand-in for fixtures: the /proc rows plus limits.
    fn fixture_diag(root: &Path, pid: u32) -> io::Result<Vec<ListenSocket>> {
        let limits = HashMap::from([(5001, 128), (5002, 64), (6001, 4096)]);
        let mut found = proc_listeners(&root.join(pid.to_string()).join("net"));
        for s in &mut found {
            s.limit = limits.get(&s.inode).copied();
        }
        Ok(found)
    }

    fn no_diag(_root: &Path, _pid: u32) -> io::Result<Vec<ListenSocket>> {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }

    fn watched(pid: u32, resource: &Arc<Resource>) -> WatchedProcess {
        WatchedProcess { pid, cgroup_id: 11, cgroup_path: testdata("cgroup/unified/svc.slice/web.service"), resource: resource.clone() }
    }

    #[test]
    fn parses_listen_rows_v4_and_v6() {
        let v4 = fs::read_to_string(testdata("proc/100/net/tcp")).unwrap();
        assert_eq!(
            parse_listen_rows(&v4),
            vec![
                ListenSocket { local: "0.0.0.0:8000".parse().unwrap(), backlog: 12, limit: None, inode: 5001 },
                ListenSocket { local: "127.0.0.1:3306".parse().unwrap(), backlog: 2, limit: None, inode: 6001 },
            ]
        );
        let v6 = fs::read_to_string(testdata("proc/100/net/tcp6")).unwrap();
        assert_eq!(
            parse_listen_rows(&v6),
            vec![
                ListenSocket { local: "[::]:9090".parse().unwrap(), backlog: 17, limit: None, inode: 5002 },
                ListenSocket { local: "[::1]:8080".parse().unwrap(), backlog: 0, limit: None, inode: 6002 },
            ]
        );
        // An established row keeps its state and queues.
        let est = parse_row("   1: 0100007F:1F40 0100007F:D431 01 0000001A:000000FF 00:00000000 00000000     0        0 5003 1 0 20 4 30 10 -1").unwrap();
        assert_eq!((est.0.local, est.1, est.2, est.0.backlog, est.0.inode), ("127.0.0.1:8000".parse().unwrap(), 1, 26, 255, 5003));
        // A v4-mapped listener in tcp6.
        let mapped = parse_row("0: 0000000000000000FFFF00000100007F:0050 00000000000000000000000000000000:0000 0A 00000000:00000001 00:00000000 00000000 0 0 77 1").unwrap();
        assert_eq!(mapped.0.local, "[::ffff:127.0.0.1]:80".parse().unwrap());
        for bad in ["", "garbage", "   3: garbage", "0: 0100007F:1F40 0100007F:0 0A zz:00 0 0 0 0 1", "0: 0100007:1F40 x 0A 0:0 0 0 0 0 1", "0: 0100007F:1F4000 x 0A 0:0 0 0 0 0 1", "0: 0100007F:1F40 x 0A 0:0 0 0 0 0 -1"] {
            assert_eq!(parse_row(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn socket_links_and_fd_dirs() {
        assert_eq!(parse_socket_link("socket:[5001]"), Some(5001));
        for bad in ["pipe:[5001]", "socket:[]", "socket:[12", "/dev/null", "anon_inode:[eventpoll]"] {
            assert_eq!(parse_socket_link(bad), None);
        }
        assert_eq!(socket_inodes(&testdata("proc/100/fd")), vec![5001, 5002, 5003]);
        assert_eq!(socket_inodes(&testdata("proc/101/fd")), vec![5001, 5004]);
        assert!(socket_inodes(&testdata("proc/999/fd")).is_empty());
    }

    #[test]
    fn fixture_backlog_counts_shared_sockets_once() {
        let (master, worker) = (res("web", 100), res("web", 101));
        let mut q = ListenQueues { read_listeners: fixture_diag, ..ListenQueues::with_proc_root(testdata("proc")) };
        let snap = q.collect(&[watched(101, &worker), watched(100, &master), watched(999, &worker)], 42);
        // 5001 is held by both 100 and 101: it counts once, for 100. 6001/6002 are someone else's.
        assert_eq!(snap.len(), 1);
        assert!(Arc::ptr_eq(&snap[0].resource, &master));
        let backlog = find(&snap[0], "tapwire.listen.backlog").unwrap();
        assert_eq!(backlog.unit, "{connection}");
        assert!(matches!(backlog.data, Data::Gauge { .. }));
        assert_eq!(points(backlog).len(), 2);
        assert_eq!(value(backlog, "server.port", "8000"), Number::Int(12));
        assert_eq!(value(backlog, "server.port", "9090"), Number::Int(17));
        assert!(points(backlog).iter().all(|p| p.time_unix_nano == 42 && p.start_unix_nano == 0));
        let limit = find(&snap[0], "tapwire.listen.backlog.limit").unwrap();
        assert_eq!(value(limit, "server.port", "8000"), Number::Int(128));
        assert_eq!(value(limit, "server.port", "9090"), Number::Int(64));

        // Four workers sharing one resource: still counted once.
        let shared = res("web", 100);
        let snap = q.collect(&[watched(100, &shared), watched(101, &shared)], 42);
        assert_eq!(value(find(&snap[0], "tapwire.listen.backlog").unwrap(), "server.port", "8000"), Number::Int(12));

        // The worker alone still reports the socket it holds.
        let snap = q.collect(&[watched(101, &worker)], 42);
        assert_eq!(points(find(&snap[0], "tapwire.listen.backlog").unwrap()).len(), 1);

        // No sock_diag: the backlog from /proc/PID/net/tcp, the limit left out (never a guess).
        let mut q = ListenQueues { read_listeners: no_diag, ..ListenQueues::with_proc_root(testdata("proc")) };
        let snap = q.collect(&[watched(100, &master)], 42);
        assert_eq!(value(find(&snap[0], "tapwire.listen.backlog").unwrap(), "server.port", "8000"), Number::Int(12));
        assert!(find(&snap[0], "tapwire.listen.backlog.limit").is_none());
        // Processes without sockets produce nothing.
        assert!(q.collect(&[watched(102, &master), watched(104, &master)], 42).is_empty());
    }

    #[test]
    fn same_port_on_v4_and_v6_adds_up() {
        let r = res("web", 1);
        let mut rows = HashMap::from([
            (1, ListenSocket { local: "0.0.0.0:80".parse().unwrap(), backlog: 3, limit: Some(511), inode: 1 }),
            (2, ListenSocket { local: "[::]:80".parse().unwrap(), backlog: 4, limit: Some(511), inode: 2 }),
        ]);
        let inodes = [1, 2];
        let snap = assemble(&[(&r, &inodes)], &rows, 9);
        assert_eq!(value(find(&snap[0], "tapwire.listen.backlog").unwrap(), "server.port", "80"), Number::Int(7));
        assert_eq!(value(find(&snap[0], "tapwire.listen.backlog.limit").unwrap(), "server.port", "80"), Number::Int(1022));
        // One of the two limits unknown: no limit point for that port.
        rows.get_mut(&2).unwrap().limit = None;
        let snap = assemble(&[(&r, &inodes)], &rows, 9);
        assert!(find(&snap[0], "tapwire.listen.backlog.limit").is_none());
    }

    #[test]
    fn sock_diag_messages() {
        let req = diag::request(libc::AF_INET6 as u8, 7);
        assert_eq!(req.len(), 72);
        assert_eq!(u32::from_ne_bytes(req[0..4].try_into().unwrap()), 72);
        assert_eq!((req[16], req[17]), (libc::AF_INET6 as u8, 6));
        assert_eq!(u32::from_ne_bytes(req[20..24].try_into().unwrap()), 1 << 10);

        let msg = |seq: u32, family: u8, state: u8, src: &[u8], port: u16, rqueue: u32, wqueue: u32, inode: u32| {
            let mut m = vec![0u8; 16 + 72];
            m[0..4].copy_from_slice(&88u32.to_ne_bytes());
            m[4..6].copy_from_slice(&20u16.to_ne_bytes());
            m[8..12].copy_from_slice(&seq.to_ne_bytes());
            m[16] = family;
            m[16 + 1] = state;
            m[16 + 4..16 + 6].copy_from_slice(&port.to_be_bytes());
            m[16 + 8..16 + 8 + src.len()].copy_from_slice(src);
            m[16 + 56..16 + 60].copy_from_slice(&rqueue.to_ne_bytes());
            m[16 + 60..16 + 64].copy_from_slice(&wqueue.to_ne_bytes());
            m[16 + 68..16 + 72].copy_from_slice(&inode.to_ne_bytes());
            m
        };
        let done = |seq: u32| {
            let mut m = vec![0u8; 20];
            m[0..4].copy_from_slice(&20u32.to_ne_bytes());
            m[4..6].copy_from_slice(&3u16.to_ne_bytes());
            m[8..12].copy_from_slice(&seq.to_ne_bytes());
            m
        };
        let (v4, v6) = (libc::AF_INET as u8, libc::AF_INET6 as u8);
        let mut out = Vec::new();
        let mut dgram = msg(7, v4, 10, &[10, 0, 0, 1], 8000, 3, 511, 5001);
        dgram.extend(msg(7, v4, 1, &[10, 0, 0, 1], 8000, 0, 99, 5003)); // not listening
        dgram.extend(msg(6, v4, 10, &[10, 0, 0, 1], 1, 0, 1, 9)); // another request's
        dgram.extend(msg(7, v6, 10, &Ipv6Addr::LOCALHOST.octets(), 443, 0, 4096, 5002));
        assert!(!diag::parse(&dgram, 7, &mut out).unwrap());
        assert!(diag::parse(&done(7), 7, &mut out).unwrap());
        assert_eq!(
            out,
            vec![
                ListenSocket { local: "10.0.0.1:8000".parse().unwrap(), backlog: 3, limit: Some(511), inode: 5001 },
                ListenSocket { local: "[::1]:443".parse().unwrap(), backlog: 0, limit: Some(4096), inode: 5002 },
            ]
        );

        let mut err = vec![0u8; 36];
        err[0..4].copy_from_slice(&36u32.to_ne_bytes());
        err[4..6].copy_from_slice(&2u16.to_ne_bytes());
        err[8..12].copy_from_slice(&7u32.to_ne_bytes());
        err[16..20].copy_from_slice(&(-libc::EPERM).to_ne_bytes());
        assert_eq!(diag::parse(&err, 7, &mut out).unwrap_err().raw_os_error(), Some(libc::EPERM));
        // Truncated or lying lengths: errors, not panics.
        let whole = msg(7, v4, 10, &[1, 2, 3, 4], 5, 1, 2, 3);
        for n in 1..whole.len() {
            let _ = diag::parse(&whole[..n], 7, &mut out);
        }
        let mut lying = msg(7, v4, 10, &[1, 2, 3, 4], 5, 1, 2, 3);
        lying[0..4].copy_from_slice(&4000u32.to_ne_bytes());
        assert!(diag::parse(&lying, 7, &mut out).is_err());
        assert!(diag::parse(&[], 7, &mut out).is_err());
    }

    /// A listener on 127.0.0.1 with an explicit listen() backlog.
    fn listener(backlog: i32) -> TcpListener {
        // SAFETY: plain socket calls on a descriptor we own; results are checked.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0);
            let owned = OwnedFd::from_raw_fd(fd);
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr { s_addr: u32::from(Ipv4Addr::LOCALHOST).to_be() },
                sin_zero: [0; 8],
            };
            let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            assert_eq!(libc::bind(fd, (&addr as *const libc::sockaddr_in).cast(), len), 0);
            assert_eq!(libc::listen(fd, backlog), 0);
            TcpListener::from(owned)
        }
    }

    #[test]
    fn five_unaccepted_clients_give_a_backlog_of_five() {
        let l = listener(16);
        let port = l.local_addr().unwrap().port();
        let clients: Vec<TcpStream> = (0..5).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
        let pid = std::process::id();
        let me = res("self", pid);
        let procs = [WatchedProcess { pid, cgroup_id: 0, cgroup_path: PathBuf::from("/nonexistent"), resource: me }];
        let mut q = ListenQueues::new();
        let read = |q: &mut ListenQueues| {
            let snap = q.collect(&procs, 1);
            let get = |name: &str| {
                let m = find(&snap[0], name)?;
                points(m).iter().find(|p| p.attributes.get("server.port") == Some(&i64::from(port).into())).map(|p| p.value)
            };
            (get("tapwire.listen.backlog"), get("tapwire.listen.backlog.limit"))
        };
        // The handshake completes in softirq; allow it a moment.
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut got = read(&mut q);
        while got.0 != Some(Number::Int(5)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            got = read(&mut q);
        }
        assert_eq!(got, (Some(Number::Int(5)), Some(Number::Int(16))));
        // Accepting two leaves three.
        let _a = l.accept().unwrap();
        let _b = l.accept().unwrap();
        assert_eq!(read(&mut q).0, Some(Number::Int(3)));
        // The /proc/PID/net/tcp fallback sees the same backlog, and no limit.
        let mut fallback = ListenQueues { read_listeners: no_diag, ..ListenQueues::new() };
        assert_eq!(read(&mut fallback), (Some(Number::Int(3)), None));
        drop(clients);
    }

    #[test]
    fn fd_tables_are_reread_only_after_the_rescan_delay() {
        let root = std::env::temp_dir().join(format!("tapwire-queue-fds-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("7/fd")).unwrap();
        fs::create_dir_all(root.join("7/net")).unwrap();
        let row = |sl: u32, port: u16, backlog: u32, inode: u64| {
            format!("{sl:4}: 00000000:{port:04X} 00000000:0000 0A 00000000:{backlog:08X} 00:00000000 00000000     0        0 {inode} 1 0 100 0 0 10 0\n")
        };
        let header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";
        std::os::unix::fs::symlink("socket:[42]", root.join("7/fd/3")).unwrap();
        fs::write(root.join("7/net/tcp"), format!("{header}{}", row(0, 80, 1, 42))).unwrap();
        let mut q = ListenQueues { read_listeners: no_diag, ..ListenQueues::with_proc_root(root.clone()) };
        let procs = [WatchedProcess { pid: 7, cgroup_id: 0, cgroup_path: root.join("cg"), resource: res("svc", 7) }];
        let ports = |snap: &Snapshot| -> Vec<(String, Number)> {
            snap.iter()
                .flat_map(|rm| points(find(rm, "tapwire.listen.backlog").unwrap()).to_vec())
                .map(|p| (p.attributes.get("server.port").unwrap().to_string(), p.value))
                .collect()
        };
        let t0 = 1_000_000_000_000;
        assert_eq!(ports(&q.collect(&procs, t0)), [("80".to_owned(), Number::Int(1))]);
        // A new listener: the backlog of known ones is fresh, the new one waits for the rescan.
        std::os::unix::fs::symlink("socket:[43]", root.join("7/fd/4")).unwrap();
        fs::write(root.join("7/net/tcp"), format!("{header}{}{}", row(0, 80, 2, 42), row(1, 81, 5, 43))).unwrap();
        assert_eq!(ports(&q.collect(&procs, t0 + 1_000_000_000)), [("80".to_owned(), Number::Int(2))]);
        let later = t0 + FD_RESCAN.as_nanos() as u64;
        assert_eq!(ports(&q.collect(&procs, later)), [("80".to_owned(), Number::Int(2)), ("81".to_owned(), Number::Int(5))]);
        // The process leaves the scan: its cache goes with it.
        assert!(q.collect(&[], later).is_empty());
        assert!(q.fds.is_empty());
        fs::remove_dir_all(&root).unwrap();
    }

    /// Needs root (CAP_SYS_ADMIN for setns), `unshare` and python3: a listener in another
    /// network namespace, read through its pid.
    #[test]
    #[ignore = "needs root: enters another network namespace"]
    fn listener_in_another_network_namespace() {
        let mut child = std::process::Command::new("unshare")
            .args(["-n", "python3", "-c", "import socket,sys,time\ns=socket.socket()\ns.bind(('0.0.0.0',0))\ns.listen(17)\nprint(s.getsockname()[1],flush=True)\ntime.sleep(30)"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
        let port: u16 = line.trim().parse().unwrap();
        let pid = child.id();
        let procs = [WatchedProcess { pid, cgroup_id: 0, cgroup_path: PathBuf::from("/nonexistent"), resource: res("ns", pid) }];
        let snap = ListenQueues::new().collect(&procs, 1);
        child.kill().unwrap();
        child.wait().unwrap();
        let port = port.to_string();
        assert_eq!(value(find(&snap[0], "tapwire.listen.backlog").unwrap(), "server.port", &port), Number::Int(0));
        assert_eq!(value(find(&snap[0], "tapwire.listen.backlog.limit").unwrap(), "server.port", &port), Number::Int(17));
    }
}
