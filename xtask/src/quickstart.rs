//! `cargo xtask run` without arguments: tapwire watching a small HTTP service, start to finish.
//!
//! cgroup `tapwire-quickstart` -> uvicorn serving tests/e2e/apps/quickstart.py inside it ->
//! `tapwire run --cgroup tapwire-quickstart` (console exporter) -> a few curl requests -> stop
//! both, remove the cgroup. Every path out of here (errors, Ctrl-C) stops the processes it
//! started and removes the cgroup: the guards below do it on drop.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    process::{display, log, output},
    signals, workspace,
};

const TAG: &str = "run";
const CGROUP: &str = "tapwire-quickstart";
/// Directory and module of the demo service (run with `uvicorn quickstart:app`).
const APP_DIR: &str = "tests/e2e/apps";
const APP_MODULE: &str = "quickstart";
/// tapwire prints this on stderr once its probes are attached.
const READY_LINE: &str = "capture ready";
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const SERVICE_TIMEOUT: Duration = Duration::from_secs(30);
/// Sent in order with curl; /fail answers 500.
const REQUESTS: &[&str] = &[
    "/hello",
    "/items/1",
    "/hello",
    "/items/42",
    "/fail",
    "/items/7",
    "/hello",
    "/fail",
    "/items/3",
    "/hello",
];

/// What the demo needs before it is worth building anything: root and the demo service.
pub fn preflight() -> Result<()> {
    if !workspace::is_root() {
        bail!(
            "the quick start creates a cgroup and loads eBPF programs: run it as root (`sudo -E cargo xtask run`)"
        );
    }
    let app = workspace::root()
        .join(APP_DIR)
        .join(format!("{APP_MODULE}.py"));
    if !app.is_file() {
        bail!("the demo service {} is missing", app.display());
    }
    Ok(())
}

pub fn quickstart(tapwire: &Path) -> Result<()> {
    preflight()?;
    signals::install();

    let cgroup = Cgroup::create(&cgroup2_mount()?, CGROUP)?;
    let port = free_port()?;
    let mut service = start_service(&cgroup, port)?;
    wait_listening(&mut service, port)?;

    let mut agent = start_agent(tapwire)?;
    wait_ready(&mut agent)?;

    log(
        TAG,
        format!(
            "sending {} requests to http://127.0.0.1:{port} with curl",
            REQUESTS.len()
        ),
    );
    for path in REQUESTS {
        signals::check()?;
        let url = format!("http://127.0.0.1:{port}{path}");
        let out = output(
            Command::new("curl")
                .args([
                    "-sS",
                    "-o",
                    "/dev/null",
                    "--max-time",
                    "5",
                    "-w",
                    "%{http_code} %{time_total}",
                ])
                .arg(&url),
        )?;
        let (code, secs) = out.split_once(' ').unwrap_or((&out, "0"));
        let ms = secs.parse::<f64>().unwrap_or(0.0) * 1000.0;
        log(TAG, format!("GET {path} -> {code} ({ms:.1} ms)"));
    }

    log(TAG, "waiting 2 s for the last spans and metrics");
    signals::sleep(Duration::from_secs(2))?;
    log(TAG, "stopping tapwire (SIGTERM)");
    let status = agent.stop(Duration::from_secs(10));
    service.stop(Duration::from_secs(5));
    drop(cgroup);
    match status {
        Some(s) if s.success() => {
            log(TAG, "done");
            Ok(())
        }
        Some(s) => bail!("tapwire exited with {s}"),
        None => bail!("tapwire did not exit after SIGTERM and was killed"),
    }
}

/// Where the cgroup v2 hierarchy is mounted: /sys/fs/cgroup/unified on hybrid hosts,
/// /sys/fs/cgroup on pure v2 hosts.
fn cgroup2_mount() -> Result<PathBuf> {
    let mounts =
        fs::read_to_string("/proc/self/mounts").context("cannot read /proc/self/mounts")?;
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(2) == Some(&"cgroup2"))
        .and_then(|f| f.get(1).map(|p| PathBuf::from(p.replace("\\040", " "))))
        .context("no cgroup2 filesystem is mounted (see /proc/self/mounts)")
}

fn free_port() -> Result<u16> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot bind a local port")?;
    Ok(listener.local_addr()?.port())
}

fn start_service(cgroup: &Cgroup, port: u16) -> Result<Managed> {
    // The wrapper shell moves itself into the cgroup, then execs the service: every thread and
    // child of the service starts inside the cgroup.
    let mut cmd = Command::new("sh");
    cmd.current_dir(workspace::root())
        .args(["-c", r#"echo $$ > "$1" && shift && exec "$@""#, "sh"])
        .arg(cgroup.path.join("cgroup.procs"))
        .arg(workspace::venv_python())
        .args([
            "-m",
            "uvicorn",
            &format!("{APP_MODULE}:app"),
            "--app-dir",
            APP_DIR,
        ])
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--log-level",
            "warning",
        ]);
    log(
        TAG,
        format!(
            "starting the service in cgroup {}: $ {}",
            cgroup.path.display(),
            display(&cmd)
        ),
    );
    Managed::spawn("service", &mut cmd)
}

fn wait_listening(service: &mut Managed, port: u16) -> Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + SERVICE_TIMEOUT;
    loop {
        signals::check()?;
        if let Some(status) = service.exited()? {
            bail!("the service exited before it listened ({status})");
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            log(TAG, format!("service listening on {addr}"));
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the service did not listen on {addr} within {} s",
                SERVICE_TIMEOUT.as_secs()
            );
        }
        signals::sleep(Duration::from_millis(100))?;
    }
}

fn start_agent(tapwire: &Path) -> Result<Managed> {
    let mut cmd = Command::new(tapwire);
    cmd.args(["run", "--cgroup", CGROUP]).stderr(Stdio::piped());
    log(TAG, format!("starting the agent: $ {}", display(&cmd)));
    // The demo shows the default console exporter: drop what would select another one.
    for (key, _) in std::env::vars_os() {
        let key_str = key.to_string_lossy();
        if key_str.starts_with("OTEL_EXPORTER_OTLP_") || key_str == "TAPWIRE_EXPORTER" {
            cmd.env_remove(&key);
        }
    }
    let mut agent = Managed::spawn("tapwire", &mut cmd)?;

    // Forward tapwire's stderr to ours line by line, watching for the ready line.
    let stderr = agent
        .child
        .stderr
        .take()
        .context("tapwire's stderr is not piped")?;
    let ready = Arc::new(AtomicBool::new(false));
    let seen = Arc::clone(&ready);
    agent.forwarder = Some(std::thread::spawn(move || {
        let mut reader = BufReader::new(stderr);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            let _ = std::io::stderr().write_all(&line);
            if String::from_utf8_lossy(&line).contains(READY_LINE) {
                seen.store(true, Ordering::SeqCst);
            }
            line.clear();
        }
    }));
    agent.ready = Some(ready);
    Ok(agent)
}

fn wait_ready(agent: &mut Managed) -> Result<()> {
    let ready = agent.ready.clone().context("agent has no ready flag")?;
    let deadline = Instant::now() + READY_TIMEOUT;
    while !ready.load(Ordering::SeqCst) {
        signals::check()?;
        if let Some(status) = agent.exited()? {
            bail!("tapwire exited before printing `{READY_LINE}` ({status})");
        }
        if Instant::now() > deadline {
            bail!(
                "tapwire did not print `{READY_LINE}` within {} s",
                READY_TIMEOUT.as_secs()
            );
        }
        signals::sleep(Duration::from_millis(50))?;
    }
    Ok(())
}

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped.
struct Managed {
    name: &'static str,
    child: Child,
    stopped: bool,
    /// Thread copying the child's stderr to ours (the agent only).
    forwarder: Option<JoinHandle<()>>,
    ready: Option<Arc<AtomicBool>>,
}

impl Managed {
    fn spawn(name: &'static str, cmd: &mut Command) -> Result<Self> {
        // Own process group: Ctrl-C reaches only xtask, which then stops the children in order
        // (agent first, so it reports everything it saw). PDEATHSIG: if xtask dies anyway, so do they.
        cmd.stdin(Stdio::null()).process_group(0);
        // SAFETY: prctl is async-signal-safe; the closure allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}: `{}`", display(cmd)))?;
        Ok(Self {
            name,
            child,
            stopped: false,
            forwarder: None,
            ready: None,
        })
    }

    fn exited(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// SIGTERM to the child's process group, up to `grace` to exit, then SIGKILL. Returns the
    /// exit status, or None when it had to be killed.
    fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if self.stopped {
            return None;
        }
        self.stopped = true;
        let pgid = self.child.id() as libc::pid_t;
        let mut status = self.child.try_wait().ok().flatten();
        if status.is_none() {
            // SAFETY: kill(2) with a negative pid signals the group we created in spawn.
            unsafe { libc::kill(-pgid, libc::SIGTERM) };
            let deadline = Instant::now() + grace;
            while status.is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
                status = self.child.try_wait().ok().flatten();
            }
        }
        let result = if status.is_none() {
            log(
                TAG,
                format!(
                    "{} did not stop within {} s: killing it",
                    self.name,
                    grace.as_secs()
                ),
            );
            // SAFETY: as above.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = self.child.wait();
            None
        } else {
            status
        };
        if let Some(forwarder) = self.forwarder.take() {
            let _ = forwarder.join();
        }
        result
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        if !self.stopped {
            log(TAG, format!("stopping {}", self.name));
        }
        self.stop(Duration::from_secs(5));
    }
}

/// A cgroup v2 directory, removed (after killing anything left in it) when dropped.
struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    fn create(mount: &Path, name: &str) -> Result<Self> {
        let path = mount.join(name);
        if path.is_dir() {
            // Left over from an interrupted run: reuse it, but not its processes.
            let left = kill_all(&path);
            log(
                TAG,
                format!(
                    "reusing cgroup {} (stopped {left} leftover processes)",
                    path.display()
                ),
            );
        } else {
            fs::create_dir(&path)
                .with_context(|| format!("cannot create cgroup {}", path.display()))?;
            log(TAG, format!("created cgroup {}", path.display()));
        }
        Ok(Self { path })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => {
                    log(TAG, format!("removed cgroup {}", self.path.display()));
                    return;
                }
                // EBUSY while processes are still in it.
                Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                    kill_all(&self.path);
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    log(
                        TAG,
                        format!("cannot remove cgroup {}: {e}", self.path.display()),
                    );
                    return;
                }
            }
        }
    }
}

/// SIGKILLs every process in the cgroup; returns how many there were.
fn kill_all(cgroup: &Path) -> usize {
    let procs = fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
    let pids: Vec<libc::pid_t> = procs
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    for &pid in &pids {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    pids.len()
}
