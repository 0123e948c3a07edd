//! A check, on a loopback connection of the agent's own, that putting a socket in the
//! propagation sockhash leaves what the application sees unchanged: readiness, `FIONREAD` and
//! the bytes in both directions.
//!
//! Kernels differ here. Linux commit 929e30f93125 (in 6.6.128+, 6.12.75+, 6.18.14+, 6.19+)
//! makes `FIONREAD` on a sockhash member count only the psock's queue, which stays empty
//! without a verdict program: nginx, which sizes its reads with FIONREAD, then stops reading an
//! upstream's response. tapwire attaches a pass-through verdict program for that reason, and
//! this check proves on the running kernel that the combination behaves before any watched
//! socket joins the sockhash. A kernel where it does not gets no propagation.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

/// Bytes the peer sends: more than one loopback segment, less than a socket buffer.
const RESPONSE_BYTES: usize = 48 * 1024;
const REQUEST: &[u8] = b"GET /tapwire-sockhash-check HTTP/1.1\r\nHost: localhost\r\n\r\n";
const WAIT: Duration = Duration::from_secs(2);

/// Connects a loopback pair, passes the client socket's fd and cookie to `join` (which adds it
/// to the sockhash), then checks the client's view. `leave` gets the cookie back at the end.
pub fn check(
    join: impl FnOnce(&TcpStream, u64) -> Result<(), String>,
    leave: impl FnOnce(u64),
) -> Result<(), String> {
    let io = |what: &str, e: std::io::Error| format!("{what}: {e}");
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| io("loopback listener", e))?;
    let client = TcpStream::connect(listener.local_addr().map_err(|e| io("loopback listener", e))?)
        .map_err(|e| io("loopback connect", e))?;
    let (mut server, _) = listener.accept().map_err(|e| io("loopback accept", e))?;
    let cookie = socket_cookie(&client).map_err(|e| io("SO_COOKIE", e))?;
    join(&client, cookie)?;
    let result = exchange(client, &mut server);
    leave(cookie);
    result
}

fn exchange(mut client: TcpStream, server: &mut TcpStream) -> Result<(), String> {
    let io = |what: &str, e: std::io::Error| format!("{what}: {e}");
    // The agent's own sends are never injected: the server must see the request as sent.
    client.write_all(REQUEST).map_err(|e| io("client send", e))?;
    let mut got = vec![0u8; REQUEST.len()];
    server.set_read_timeout(Some(WAIT)).map_err(|e| io("timeout", e))?;
    server.read_exact(&mut got).map_err(|e| io("server read", e))?;
    if got != REQUEST {
        return Err("the bytes a sockhash member sent arrived changed".into());
    }
    let response: Vec<u8> = (0..RESPONSE_BYTES).map(|i| (i % 251) as u8).collect();
    server.write_all(&response).map_err(|e| io("server send", e))?;

    if !readable_within(&client, WAIT) {
        return Err("a sockhash member holding received data was never reported readable by poll".into());
    }
    // FIONREAD must count what arrived (loopback delivers it all promptly).
    let deadline = Instant::now() + WAIT;
    let mut queued = 0;
    while Instant::now() < deadline {
        queued = fionread(&client).map_err(|e| io("FIONREAD", e))?;
        if queued >= RESPONSE_BYTES {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if queued != RESPONSE_BYTES {
        return Err(format!(
            "ioctl(FIONREAD) on a sockhash member reports {queued} bytes while {RESPONSE_BYTES} are queued \
             (applications that size their reads with it, such as nginx, would stall)"
        ));
    }
    let mut read = vec![0u8; RESPONSE_BYTES];
    client.set_read_timeout(Some(WAIT)).map_err(|e| io("timeout", e))?;
    client.read_exact(&mut read).map_err(|e| io("client read", e))?;
    if read != response {
        return Err("the bytes a sockhash member received were changed".into());
    }
    Ok(())
}

fn socket_cookie(s: &TcpStream) -> std::io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket fd and an out-parameter of the size passed.
    let rc = unsafe {
        libc::getsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_COOKIE, (&raw mut cookie).cast(), &raw mut len)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

fn fionread(s: &TcpStream) -> std::io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    if unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &raw mut n) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

fn readable_within(s: &TcpStream, wait: Duration) -> bool {
    let mut pfd = libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one pollfd.
    let rc = unsafe { libc::poll(&raw mut pfd, 1, wait.as_millis() as libc::c_int) };
    rc == 1 && pfd.revents & libc::POLLIN != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_socket_passes() {
        // Without any sockhash the check is a plain loopback exchange: it must pass, so a
        // failure under the agent is the kernel's doing.
        let mut left = None;
        check(
            |_, cookie| {
                assert_ne!(cookie, 0);
                Ok(())
            },
            |cookie| left = Some(cookie),
        )
        .unwrap();
        assert!(left.is_some());
    }
}
