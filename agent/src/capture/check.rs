//! `tapwire check`: the preflight a node operator runs. Every line says what was checked and,
//! when it failed, why and what to do.

use std::{fmt::Write as _, path::Path};

use super::{CaptureConfig, HOOKS, Probes, caps, tracefs};
use crate::discover::cgroup;

/// Result of one check line.
pub struct Line {
    pub ok: bool,
    /// Required for tapwire to run (a failing required line makes the exit status non-zero).
    pub required: bool,
    pub what: String,
    pub detail: String,
}

/// Where the propagation sockhash would be pinned, and what stopped tapwire processes left there.
fn bpffs_detail() -> String {
    use super::pin::{BPFFS, DIR, is_bpffs, pins};
    if !is_bpffs(BPFFS) {
        return format!(
            "not mounted at {BPFFS}: tapwire mounts it when it holds CAP_SYS_ADMIN; otherwise the propagation \
             sockhash is not pinned, and stopping tapwire loses responses in flight on propagated connections \
             (mount it: mount -t bpf bpf {BPFFS})"
        );
    }
    let left = pins(None);
    let connections: usize = left.iter().filter_map(|(_, n)| *n).sum();
    match left.len() {
        0 => format!("mounted at {BPFFS}; no sockhash pinned under {DIR}"),
        n => format!(
            "mounted at {BPFFS}; {n} sockhash(es) pinned under {DIR} holding {connections} connection(s) \
             (a running tapwire's, or left by stopped ones until their connections close)"
        ),
    }
}

/// Runs every check. Returns the lines and whether tapwire can run here.
pub fn run() -> (Vec<Line>, bool) {
    let mut lines = Vec::new();
    let mut push = |ok: bool, required: bool, what: &str, detail: String| {
        lines.push(Line { ok, required, what: what.to_owned(), detail });
    };

    let uname = nix::sys::utsname::uname().ok();
    let release = uname.as_ref().map_or_else(|| "unknown".into(), |u| u.release().to_string_lossy().into_owned());
    let (major, minor) = parse_kernel(&release);
    push((major, minor) >= (5, 8), true, "kernel", format!("Linux {release} (needs 5.8 or later for ring buffers)"));

    let uid = nix::unistd::geteuid();
    let effective = caps::effective();
    let held: Vec<&str> = caps::CAPABILITIES.iter().filter(|c| effective.is_some_and(|set| set & (1 << c.bit) != 0)).map(|c| c.name).collect();
    push(
        effective.is_some(),
        true,
        "privileges",
        match effective {
            Some(_) => format!("uid {uid}; of the capabilities below, holds {}", if held.is_empty() { "none".into() } else { held.join(", ") }),
            None => "cannot read the effective capabilities (CapEff) from /proc/self/status".into(),
        },
    );

    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    push(btf, false, "kernel BTF", if btf { "/sys/kernel/btf/vmlinux present".into() } else { "/sys/kernel/btf/vmlinux missing (not needed by the tracepoint probes)".into() });

    let tracefs_mounted = match tracefs::ensure() {
        tracefs::TracefsState::Ready { mounted_by_us } => {
            push(true, true, "tracefs", if mounted_by_us { format!("was not mounted; mounted it at {}", tracefs::TRACEFS) } else { format!("mounted at {}", tracefs::TRACEFS) });
            true
        }
        tracefs::TracefsState::Unavailable { reason } => {
            push(false, true, "tracefs", reason);
            false
        }
    };
    push(super::pin::is_bpffs(super::pin::BPFFS), false, "bpffs", bpffs_detail());
    if let Some(set) = effective {
        for (ok, required, what, detail) in caps::report(set, (major, minor), tracefs_mounted) {
            push(ok, required, &what, detail);
        }
    }

    match cgroup::cgroup2_mount() {
        Some(m) => push(true, true, "cgroup2", format!("cgroup v2 mounted at {}", m.display())),
        None => push(false, true, "cgroup2", "no cgroup2 filesystem in /proc/self/mounts: tapwire selects services by cgroup v2; mount it (e.g. at /sys/fs/cgroup/unified)".into()),
    }

    match Probes::load(&CaptureConfig::default()) {
        Err(e) => push(false, true, "eBPF programs", error_chain(&e)),
        Ok(mut probes) => {
            push(true, true, "eBPF programs", "the kernel accepted tapwire's object (maps and ring buffer created)".into());
            for hook in HOOKS {
                let (_, category, name, purpose) = *hook;
                match probes.attach(hook) {
                    Ok(()) => push(true, true, &format!("hook {category}/{name}"), format!("loads and attaches ({purpose})")),
                    Err(e) => push(false, true, &format!("hook {category}/{name}"), error_chain(&e)),
                }
            }
            // Dropping `probes` detaches everything again.
        }
    }
    let ok = lines.iter().all(|l| l.ok || !l.required);
    (lines, ok)
}

/// Formats the report the way `tapwire check` prints it.
pub fn render(lines: &[Line], ok: bool) -> String {
    let mut out = String::new();
    let width = lines.iter().map(|l| l.what.len()).max().unwrap_or(0);
    for l in lines {
        let mark = match (l.ok, l.required) {
            (true, _) => "ok  ",
            (false, true) => "FAIL",
            (false, false) => "warn",
        };
        let _ = writeln!(out, "[{mark}] {:width$}  {}", l.what, l.detail);
    }
    let _ = writeln!(out, "{}", if ok { "tapwire can run on this node." } else { "tapwire cannot run on this node: fix the FAIL lines above." });
    out
}

fn parse_kernel(release: &str) -> (u32, u32) {
    let mut it = release.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// "outer: inner: innermost" so the operator sees the kernel's reason.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let _ = write!(s, ": {inner}");
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_release_parses() {
        assert_eq!(parse_kernel("6.18.44-fc-v657"), (6, 18));
        assert_eq!(parse_kernel("5.15.0-91-generic"), (5, 15));
        assert_eq!(parse_kernel("garbage"), (0, 0));
    }
}
